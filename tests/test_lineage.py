"""Lineage: a run's data set described (name, source, digest of files and labels, splits, classes)
and logged to MLflow as the run's dataset input."""
import json

from mlflow.tracking import MlflowClient

from orchestrator import Model
from trainers.data.lineage import describe_dataset
from trainers.data.shapes import NAMES, generate_shapes


def test_a_run_logs_its_dataset_and_the_digest_follows_files_and_labels(tmp_path):
    data = generate_shapes(tmp_path / "tinyset", n_train=8, n_val=4, imgsz=32)
    described = describe_dataset(str(data), "detect")
    assert described["name"] == "tinyset" and described["source"] == str(data)
    assert described["splits"] == {"train": 8, "val": 4} and described["names"] == list(NAMES)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
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
