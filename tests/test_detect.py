"""Detection end to end: events, learning, COCO agreement, prediction sources and callbacks, export,
and checkpoints of custom model classes loaded in a fresh process."""
import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator import Model
from tests.helpers import EventRecorder, expected_events
from tests.servers import mlflow_store
from trainers.data.shapes import generate_shapes
from trainers.metrics.coco import coco_eval
from trainers.utils import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny and a small shapes dataset, plus one tracking store shared by this module's runs."""
    root = tmp_path_factory.mktemp("detect")
    tiny = generate_shapes(root / "tiny", n_train=32, n_val=16, imgsz=64)
    small = generate_shapes(root / "small", n_train=192, n_val=48, imgsz=64, seed=1)
    return {"root": root, "tiny": tiny, "small": small,
            "run": dict(project=str(root / "runs"), tracking_uri=mlflow_store(root / "mlflow.db"),
                        storage=str(root / "store"), verbose=False, plots=False, workers=0, imgsz=64)}


@pytest.fixture(scope="module")
def trained(work):
    """A short run that learns: small batches, AdamW, light augmentation (it slows short runs down)."""
    model = Model("det-n.yaml")
    metrics = model.train(data=str(work["small"]), epochs=12, batch=8, nbs=8, optimizer="AdamW", lr0=0.003,
                          warmup_epochs=0.5, lrf=0.1, scale=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, fliplr=0.0,
                          name="learn", **work["run"])  # about 0.3 mAP50 (seeds 0 and 1)
    return model, metrics


def test_detection_event_sequence_includes_validation_each_epoch_and_final_eval(work):
    model = Model("det-n.yaml")
    rec = EventRecorder().register(model)
    metrics = model.train(data=str(work["tiny"]), epochs=2, batch=8, nbs=16, name="events", **work["run"])
    trainer = model.trainer
    n_batches, n_val = len(trainer.train_loader), len(trainer.test_loader)
    assert (n_batches, trainer.accumulate, n_val) == (4, 2, 1)
    assert rec.names == expected_events(2, n_batches, trainer.accumulate, n_val)
    fit_ends = [(epoch, final) for e, epoch, final in rec.events if e == "on_fit_epoch_end"]
    assert fit_ends == [(0, False), (1, False), (2, True)]
    assert trainer.loss_names == ("box_loss", "cls_loss", "dfl_loss")
    for key in ("metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)"):
        assert key in metrics
    row = trainer.history.rows[-1]
    assert {"train/box_loss", "val/box_loss", "val/cls_loss", "val/dfl_loss", "fitness"} <= set(row)
    assert row["fitness"] == pytest.approx(row["metrics/mAP50-95(B)"])  # default weights [0, 0, 0, 1]
    box = trainer.validator.metrics.box
    for attr in ("p", "r", "f1", "ap50", "ap", "ap_class_index", "mp", "mr", "map50", "map", "image_metrics"):
        assert hasattr(box, attr), attr
    assert len(box.image_metrics) == 16


def test_short_run_learns(work, trained):
    model, metrics = trained
    untrained = Model("det-n.yaml").val(data=str(work["small"]), imgsz=64, verbose=False, plots=False)
    assert untrained["metrics/mAP50(B)"] < 0.05, untrained
    assert metrics["metrics/mAP50(B)"] > untrained["metrics/mAP50(B)"] + 0.15, metrics


def test_train_returns_the_final_evaluation_as_a_metrics_object(trained):
    """Rebuilt on the driver from the final evaluation's record: the same arrays and means as the
    validator's own object (in process here, so both can be compared)."""
    model, metrics = trained
    final = model.trainer.validator.metrics
    for name in ("p", "r", "f1", "ap50", "ap", "ap_class_index"):
        assert getattr(metrics.box, name).tolist() == getattr(final.box, name).tolist(), name
    assert len(metrics.box.ap) == len(metrics.box.ap_class_index) == model.model.nc
    box = metrics.box
    assert (box.mp, box.mr, box.map50, box.map) == (final.box.mp, final.box.mr, final.box.map50, final.box.map)
    assert [box.mp, box.mr, box.map50, box.map, metrics.fitness] == [
        metrics[k] for k in ("metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)",
                             "metrics/mAP50-95(B)", "fitness")]
    assert metrics.names == model.model.names and not any(k.startswith("per_class/") for k in metrics)


def test_val_save_json_agrees_with_pycocotools(work, trained):
    model, _ = trained
    out = work["root"] / "val"
    metrics = model.val(data=str(work["small"]), save_json=True, plots=True, project=str(work["root"]),
                        name="val", verbose=False)
    labels, preds = out / "labels.json", out / "predictions.json"
    assert labels.is_file() and preds.is_file()
    assert len(json.loads(labels.read_text())["images"]) == 48
    assert (out / "PR_curve.png").is_file() and (out / "confusion_matrix_normalized.png").is_file()
    coco = coco_eval(labels, preds, max_dets=300)
    assert metrics["metrics/mAP50-95(B)"] > 0.05  # a model that finds things: a meaningful comparison
    assert metrics.box.map == metrics["metrics/mAP50-95(B)"] and len(metrics.box.image_metrics) == 48
    assert abs(coco["map"] - metrics["metrics/mAP50-95(B)"]) < 0.005, (coco, metrics)
    assert abs(coco["map50"] - metrics["metrics/mAP50(B)"]) < 0.005, (coco, metrics)


def test_cli_val_says_where_its_plots_went_in_a_new_folder_each_time(work, trained, capsys):
    from orchestrator.cli import main

    model, _ = trained
    argv = ["val", f"model={model.ckpt_path}", f"data={work['small']}", f"project={work['root']}", "name=cli-val"]
    for folder in ("cli-val", "cli-val2"):  # numbered as runs are
        assert main(argv) == 0
        assert capsys.readouterr().out.splitlines()[-1] == f"plots in {work['root'] / folder}"
        assert (work["root"] / folder / "confusion_matrix_normalized.png").is_file()


def _val_images(work):
    return sorted((work["small"].parent / "images" / "val").glob("*.png"))


def test_predict_sources(work, trained):
    model, _ = trained
    files = _val_images(work)
    one = model.predict(str(files[0]))
    assert len(one) == 1 and one[0].path == str(files[0]) and one[0].orig_img.shape == (64, 64, 3)
    folder = model.predict(str(files[0].parent), batch=5)
    assert [r.path for r in folder] == [str(f) for f in files]
    arrays = [np.array(Image.open(f).convert("RGB")) for f in files[:3]]
    assert len(model.predict(arrays)) == 3
    batch = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays]).float() / 255
    from_tensor = model.predict(batch)
    assert [r.path for r in from_tensor] == ["tensor0", "tensor1", "tensor2"]
    for r in folder:
        b = r.boxes
        assert b.xyxy.shape[1] == 4 and len(b.conf) == len(b.cls) == len(b)
        assert bool((b.conf >= 0.25).all()) and r.plot().shape == (64, 64, 3)
    assert sum(len(r.boxes) for r in folder) > 0


def test_predict_boxes_are_in_original_pixels(work, trained):
    """A 2x larger, non-square copy of an image gives the same boxes, 2x larger and shifted."""
    model, _ = trained
    image = np.asarray(Image.open(_val_images(work)[0]).convert("RGB"))
    big = np.full((128 + 40, 128, 3), 114, np.uint8)  # 2x upscale, 40 rows of letterbox-grey on top
    big[40:] = np.asarray(Image.fromarray(image).resize((128, 128), Image.Resampling.BILINEAR))
    small_r, big_r = model.predict([image, big], conf=0.1)
    assert big_r.orig_img.shape == (168, 128, 3)
    assert len(small_r.boxes) > 0
    top = small_r.boxes.xyxy[small_r.boxes.conf.argmax()]
    mapped = (big_r.boxes.xyxy - torch.tensor([0, 40, 0, 40])) / 2
    from trainers.utils.ops import box_iou
    assert box_iou(top[None], mapped).max() > 0.8


def test_stream_is_lazy(work, trained):
    model, _ = trained
    batches = []
    model.add_callback("on_predict_batch_start", lambda p: batches.append(list(p.batch[0])))
    try:
        gen = model.predict(str(_val_images(work)[0].parent), stream=True, batch=4)
        assert inspect.isgenerator(gen) and batches == []
        first = next(gen)
        assert len(batches) == 1 and first.path == batches[0][0]
        assert len(list(gen)) == 47 and len(batches) == 12
    finally:
        model.clear_callback("on_predict_batch_start")


def test_callback_replacing_results_changes_what_iteration_yields(work, trained):
    model, _ = trained

    def zip_with_frames(predictor):
        predictor.results = list(zip(predictor.results, predictor.batch[1]))

    model.add_callback("on_predict_batch_end", zip_with_frames)
    try:
        out = list(model.predict(str(_val_images(work)[0].parent), stream=True, batch=4))
    finally:
        model.clear_callback("on_predict_batch_end")
    assert len(out) == 48
    for result, frame in out:
        assert result.orig_img is frame


def test_callback_flipping_save_saves_only_those_batches(work, trained):
    model, _ = trained
    wanted = {"00003", "00007", "00020"}

    def save_some(predictor):
        predictor.args.save = Path(predictor.batch[0][0]).stem in wanted

    model.add_callback("on_predict_postprocess_end", save_some)
    try:
        results = model.predict(str(_val_images(work)[0].parent), batch=1, save=True,
                                project=str(work["root"]), name="saved")
    finally:
        model.clear_callback("on_predict_postprocess_end")
    assert len(results) == 48
    assert {p.stem for p in (work["root"] / "saved").glob("*.png")} == wanted


def test_torchscript_export_matches_eager(trained):
    model, _ = trained
    path = model.export(format="torchscript")
    assert path.endswith(".torchscript")
    scripted = torch.jit.load(path)
    x = torch.rand(2, 3, 64, 64)
    eager = model.model.eval()
    with torch.no_grad():
        decoded, _ = eager(x)
        out = scripted(x)
    assert out.shape == decoded.shape == (2, 4 + 4, 84)
    assert torch.allclose(out, decoded, atol=1e-4)


def test_onnx_export_matches_eager(trained):
    ort = pytest.importorskip("onnxruntime")
    model, _ = trained
    path = model.export(format="onnx")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, 64, 64)
    (out,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        decoded, _ = model.model.eval()(x)
    assert np.allclose(out, decoded.numpy(), atol=1e-4)


# ----------------------------------------------------------------------------- custom model classes
def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


TRAIN_SCRIPT = """
from orchestrator import Model
{define}
Model("det-n.yaml").train(data={data!r}, trainer=Trainer, epochs=1, batch=16, imgsz=64, verbose=False,
                          plots=False, project={project!r}, name={name!r}, tracking_uri={uri!r},
                          storage={store!r})
"""

IN_MAIN = """
from trainers.detect import DetectionModel, DetectionTrainer
class ScriptModel(DetectionModel):
    pass
class Trainer(DetectionTrainer):
    def get_model(self, cfg=None, weights=None, verbose=True):
        return ScriptModel(cfg or "det-n.yaml", nc=self.data["nc"], verbose=False)
"""

IN_MODULE = "from examples.custom_class_weights import WeightedTrainer as Trainer"

# Classes of the user's script on Ray workers: trained on 1 and 2 workers, then validated and
# loaded in the same script.
MAIN_ON_RAY = "from orchestrator import Model" + IN_MAIN + """
import sys
for workers in (2,):  # several ranks unpickle the script's classes
    model = Model("det-n.yaml")
    model.train(data={data!r}, trainer=Trainer, epochs=1, batch=16, imgsz=64, verbose=False, plots=False,
                num_workers=workers, project={project!r}, name={name!r} + str(workers), tracking_uri={uri!r},
                storage={store!r})
    metrics = model.val(data={data!r}, batch=16, plots=False)
    again = Model(str(model.ckpt_path))
    print("TRAINED", workers, type(model.model).__name__, type(again.model).__name__,
          "metrics/mAP50(B)" in metrics, model.ckpt_path)
"""

LOAD = """
from orchestrator import Model
from trainers.utils import UserError
try:
    m = Model({path!r})
    print("LOADED", type(m.model).__module__, type(m.model).__name__)
except UserError as e:
    print("ERROR", e)
"""


def test_custom_model_class_from_a_module_loads_in_a_fresh_process(work):
    script = TRAIN_SCRIPT.format(define=IN_MODULE, data=str(work["tiny"]), project=work["run"]["project"],
                                 name="custom_module", uri=work["run"]["tracking_uri"], store=work["run"]["storage"])
    trained = _run(script, ROOT)
    assert trained.returncode == 0, trained.stderr[-2000:]
    best = Path(work["run"]["project"]) / "custom_module" / "weights" / "best.pt"
    loaded = _run(LOAD.format(path=str(best)), work["root"])  # cwd without the repo: a fresh process
    assert loaded.stdout.split() == ["LOADED", "examples.custom_class_weights", "WeightedDetectionModel"]


def test_script_classes_train_on_ray_workers_and_load_in_their_script(work):
    script = textwrap.dedent(MAIN_ON_RAY).format(
        data=str(work["tiny"]), project=work["run"]["project"], name="custom_main",
        uri=work["run"]["tracking_uri"], store=work["run"]["storage"])
    trained = _run(script, ROOT)
    assert trained.returncode == 0, trained.stderr[-3000:]
    done = [line.split() for line in trained.stdout.splitlines() if line.startswith("TRAINED")]
    assert [d[:5] for d in done] == [["TRAINED", "2", "ScriptModel", "ScriptModel", "True"]]
    loaded = _run(LOAD.format(path=done[-1][5]), work["root"])  # a fresh process has no ScriptModel
    message = loaded.stdout
    assert message.startswith("ERROR") and "'ScriptModel'" in message, message
    assert "__main__" in message and "define it in a module" in message, message


def test_plots_saved_at_every_validation_and_forwarded(work):
    seen = []

    def note_plot_times(validator):
        files = [Path(validator.plots[k]) for k in ("PR_curve.png", "confusion_matrix_normalized.png")]
        seen.append([f.stat().st_mtime_ns for f in files])

    model = Model("det-n.yaml")
    model.add_callback("on_val_end", note_plot_times)
    records = []
    model.add_callback("on_val_end", records.append, where="driver")
    model.train(data=str(work["tiny"]), epochs=2, batch=8, name="plots", **{**work["run"], "plots": True})
    assert len(seen) == 3  # two epochs and the final evaluation, each writing fresh plots
    assert seen[0] != seen[1] != seen[2]
    assert all("PR_curve.png" in r["artifacts"] for r in records)


def test_a_fresh_spec_predicts_and_exports_without_a_data_set_and_validates_on_one(work, tmp_path):
    model = Model("det-n.yaml")  # as YOLO("yolov8n.yaml")(images): classes from the spec
    (result,) = model([np.zeros((64, 64, 3), dtype=np.uint8)], imgsz=40)  # rounded up to the stride: 64
    assert result.names == {i: str(i) for i in range(8)} and result.boxes.data.shape[1] == 6
    path = model.export(format="torchscript", imgsz=64, project=str(tmp_path))
    assert torch.jit.load(path)(torch.rand(1, 3, 64, 64)).shape == (1, 4 + 8, 84)
    metrics = Model("det-n.yaml").val(data=str(work["tiny"]), imgsz=48, batch=16, plots=False)  # 64 too
    assert metrics.box.map50 == metrics["metrics/mAP50(B)"] and 0.0 <= metrics.box.map50 <= 1.0
    with pytest.raises(UserError, match="config key 'data' is required"):
        Model("det-n.yaml").val()


def test_results_say_what_was_found_in_one_line_as_ultralytics_prints_it():
    """``orchestrator predict`` prints each image's ``verbose()``: counts per class (plural past
    one), "(no detections)", or a classifier's top classes with their probabilities."""
    from trainers.engine.results import Results

    names, image = {0: "circle", 1: "square", 2: "cross"}, np.zeros((8, 8, 3), np.uint8)
    boxes = torch.tensor([[0, 0, 2, 2, 0.9, 1], [1, 1, 3, 3, 0.8, 0], [2, 2, 4, 4, 0.7, 1]])
    assert Results(image, "a.png", names, boxes=boxes).verbose() == "1 circle, 2 squares"
    assert Results(image, "a.png", names, boxes=torch.zeros(0, 6)).verbose() == "(no detections)"
    probs = torch.tensor([0.2, 0.7, 0.1])
    assert Results(image, "a.png", names, probs=probs).verbose() == "square 0.70, circle 0.20, cross 0.10"
