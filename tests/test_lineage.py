"""Lineage from data to model: a run's data set described (name, source, digest of files and labels,
splits, classes) and logged to MLflow as the run's dataset input; its best.pt a logged model linked to
the run's final metrics and that data set, registered, and served."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from orchestrator import Model
from trainers.data.lineage import describe_dataset
from trainers.data.shapes import NAMES, generate_shapes
from tests.servers import mlflow_store


def test_a_run_logs_its_dataset_and_the_digest_follows_files_and_labels(tmp_path):
    data = generate_shapes(tmp_path / "tinyset", n_train=8, n_val=4, imgsz=32)
    described = describe_dataset(str(data), "detect")
    assert described["name"] == "tinyset" and described["source"] == str(data)
    assert described["splits"] == {"train": 8, "val": 4} and described["names"] == list(NAMES)
    uri = mlflow_store(tmp_path / "mlflow.db")
    model = Model("det-n.yaml")
    model.train(data=str(data), epochs=1, imgsz=32, batch=4, verbose=False, plots=False, project=str(tmp_path / "runs"),
                tracking_uri=uri, storage=str(tmp_path / "store"), journal=str(tmp_path / "journal"))
    (given,) = MlflowClient(uri).get_run(model.mlflow_run_id).inputs.dataset_inputs
    assert (given.dataset.name, given.dataset.digest) == ("tinyset", described["digest"])
    assert json.loads(given.dataset.source) == {"uri": str(data)}
    assert json.loads(given.dataset.profile) == {"splits": described["splits"], "names": described["names"]}
    assert [(t.key, t.value) for t in given.tags] == [("mlflow.data.context", "training")]

    label = sorted((data.parent / "labels" / "train").glob("*.txt"))[0]
    label.write_text(label.read_text() + "0 0.5 0.5 0.1 0.1\n")  # one more box: another data set
    relabelled = describe_dataset(str(data), "detect")["digest"]
    image = sorted((data.parent / "images" / "val").iterdir())[0]
    image.rename(image.with_name("renamed" + image.suffix))
    assert len({described["digest"], relabelled, describe_dataset(str(data), "detect")["digest"]}) == 3


def test_digits_is_described_by_its_file_and_held_out_split():
    digits = describe_dataset("digits", "classify")
    assert digits["name"] == "digits" and digits["source"].endswith("digits.csv.gz")
    assert digits["splits"] == {"train": 1438, "val": 359} and digits["names"] == [str(i) for i in range(10)]
    assert describe_dataset(None, "classify") is None


SERVE = """
import json, sys
import mlflow, numpy as np, torch
from trainers.config import get_cfg
from trainers.detect.predict import DetectionPredictor

mlflow.set_tracking_uri(sys.argv[1])
images = list(np.load(sys.argv[2]))
module = mlflow.pytorch.load_model("models:/shapes-detector/1")
predictor = DetectionPredictor(args=get_cfg(None, {"mode": "predict", "imgsz": 64, "conf": 0.01, "save": False}))
boxes = [r.boxes.data.tolist() for r in predictor(source=images, model=module)]
table = mlflow.pyfunc.load_model("models:/shapes-detector/1", model_config={"conf": 0.01}).predict(np.stack(images))
print(json.dumps({"class": type(module).__name__, "boxes": boxes, "table": table.values.tolist()}))
"""


def test_best_pt_is_a_logged_model_linked_to_its_metrics_and_data_and_serves_the_same_boxes(tmp_path):
    """The registered version loads in a fresh process with ``mlflow.pytorch`` (the module: same
    boxes as ``Model(best.pt).predict``) and ``mlflow.pyfunc`` (images in, a table of the same boxes)."""
    data = generate_shapes(tmp_path / "shapes", n_train=32, n_val=8, imgsz=64)
    uri = mlflow_store(tmp_path / "mlflow.db")
    model = Model("det-n.yaml")
    model.train(data=str(data), epochs=2, imgsz=64, batch=8, verbose=False, plots=False, project=str(tmp_path / "runs"),
                tracking_uri=uri, storage=str(tmp_path / "store"), journal=str(tmp_path / "journal"),
                register="shapes-detector")
    assert "MLFLOW_TRACKING_URI" not in os.environ  # logging the model left the next run's default alone
    client = MlflowClient(uri)
    run = client.get_run(model.mlflow_run_id)
    logged = client.get_logged_model(model.mlflow_model_id)
    assert (str(logged.status), logged.source_run_id, logged.model_type) == ("READY", run.info.run_id, "detect")
    assert logged.params == run.data.params and logged.params["epochs"] == "2"
    finals = sorted(k for k in run.data.metrics if k.startswith("final/"))
    assert finals and sorted(m.key for m in logged.metrics) == finals  # each final point linked once
    given = run.inputs.dataset_inputs[0].dataset
    assert {(m.dataset_name, m.dataset_digest) for m in logged.metrics} == {(given.name, given.digest)}
    assert all(m.value == run.data.metrics[m.key] for m in logged.metrics)
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(logged.model_id, logged.metrics[0].step)]
    assert all(len(client.get_metric_history(run.info.run_id, k)) == 1 for k in finals)  # the run gained no point
    (version,) = client.search_model_versions("name='shapes-detector'")
    assert (version.source, version.run_id) == (f"models:/{logged.model_id}", run.info.run_id)
    assert float(version.tags["metrics/mAP50B"]) == pytest.approx(run.data.metrics["final/metrics/mAP50B"], abs=1e-5)

    files = sorted((data.parent / "images" / "val").iterdir())[:4]
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    np.save(tmp_path / "images.npy", np.stack(images))
    reference = [r.boxes.data.tolist() for r in Model(str(model.ckpt_path)).predict(images, conf=0.01)]
    assert sum(map(len, reference)) > 0
    out = subprocess.run([sys.executable, "-c", SERVE, uri, str(tmp_path / "images.npy")], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    served = json.loads(out.stdout.strip().splitlines()[-1])
    assert served["class"] == "DetectionModel" and served["boxes"] == reference
    rows = [[i, *box[:5], int(box[5]), NAMES[int(box[5])]] for i, boxes in enumerate(reference) for box in boxes]
    assert len(served["table"]) == len(rows)
    for got, want in zip(served["table"], rows):
        assert got[0] == want[0] and got[6:] == want[6:] and got[1:6] == pytest.approx(want[1:6], abs=1e-4)
