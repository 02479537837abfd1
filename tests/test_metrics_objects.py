"""What model.val() and model.train() return: the task's metrics object, read like the dict it replaced;
per-class values in the final evaluation's record, kept out of MLflow and the registry's tags."""
import pytest

from callbacks.sinks.mlflow_points import MetricPoints
from orchestrator import Model
from orchestrator.results import ResultSink
from trainers.metrics.base import PER_CLASS
from trainers.metrics.classify import ClassifyMetrics
from trainers.utils import UserError


def test_a_metrics_object_reads_as_a_read_only_dict():
    m = ClassifyMetrics()
    m.process(7, 9, 10)
    m.keep_extra({**m.results_dict, "val/loss": 0.5})
    expected = {"metrics/accuracy_top1": 0.7, "metrics/accuracy_top5": 0.9, "fitness": 0.8, "val/loss": 0.5}
    assert m.results_dict == pytest.approx(expected) and list(m) == list(expected)
    assert m["metrics/accuracy_top1"] == m.top1 and m["fitness"] == m.fitness == pytest.approx(0.8)
    assert "val/loss" in m and m.get("missing", -1) == -1 and len(m) == 4
    assert dict(m) == {**m} == dict(m.items()) == m.results_dict == m  # a Mapping compares as a dict
    assert repr(m).startswith("ClassifyMetrics({'metrics/accuracy_top1': 0.7")
    with pytest.raises(TypeError):
        m["fitness"] = 1.0
    with pytest.raises(KeyError):
        m["missing"]
    restored = ClassifyMetrics()
    restored.restore(m.results_dict)
    assert (restored.top1, restored.top5, restored.extra) == (m.top1, m.top5, {"val/loss": 0.5})


def test_per_class_values_reach_model_train_but_not_mlflow_or_the_registry():
    record = {"rank": 0, "epoch": 3, "time": 1.0, "final_eval": True,
              "metrics": {"metrics/mAP50(B)": 0.5, "fitness": 0.4, f"{PER_CLASS}box/2/ap50": 0.25}}
    sink = ResultSink()
    sink.on_fit_epoch_end(record)
    report = sink.close("FINISHED")
    assert report["metrics"] == {"metrics/mAP50(B)": 0.5, "fitness": 0.4}  # what register= tags
    assert report["per_class"] == {f"{PER_CLASS}box/2/ap50": 0.25}
    points = MetricPoints().of("on_fit_epoch_end", record)
    assert sorted(p[0] for p in points) == ["final/fitness", "final/metrics/mAP50B"]


def test_val_returns_the_validators_metrics_object_with_logged_values():
    seen = []

    def on_val_end(validator):
        seen.append(validator)
        validator.log({"custom/images": validator.seen})

    model = Model("cls-n.yaml")
    model.add_callback("on_val_end", on_val_end)
    metrics = model.val(data="digits", imgsz=16, batch=128, verbose=False)
    (validator,) = seen
    assert isinstance(metrics, ClassifyMetrics) and validator.metrics is metrics is model.metrics
    assert metrics.top1 == metrics["metrics/accuracy_top1"] == validator.metrics_dict["metrics/accuracy_top1"]
    assert metrics.top5 == metrics["metrics/accuracy_top5"] > metrics.top1 > 0
    assert metrics.fitness == metrics["fitness"] == pytest.approx((metrics.top1 + metrics.top5) / 2)
    assert metrics["custom/images"] == validator.seen > 100


def test_classification_val_takes_the_split_asked_for():
    seen = []
    model = Model("cls-n.yaml")
    model.add_callback("on_val_end", lambda validator: seen.append(validator.seen))
    model.val(data="digits", imgsz=16, batch=256, verbose=False)
    model.val(data="digits", imgsz=16, batch=256, verbose=False, split="train")
    assert seen[1] > 3 * seen[0]  # digits holds out a fifth for val
    with pytest.raises(UserError, match=r"^config key 'split': value 'tset' is not valid \(a classification"):
        model.val(data="digits", imgsz=16, split="tset")
