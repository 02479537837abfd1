"""Detection metrics: agreement with pycocotools, matching, per-image metrics, confusion matrix."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from trainers.metrics.coco import coco_eval, coco_image_id, write_coco_labels, write_coco_predictions
from trainers.metrics.detection import (ConfusionMatrix, DetMetrics, Metric, ap_per_class,
                                        match_predictions)
from trainers.utils import UserError

NAMES = ["circle", "square", "triangle", "cross"]


def _random_split(seed: int, n_img: int = 40, nc: int = 4):
    """Ground truth with a rare class and empty images; predictions that are jittered copies
    (some with the wrong class, some duplicates) plus random false positives."""
    rng = np.random.default_rng(seed)
    labels, preds, targets, files = [], [], [], []
    for i in range(n_img):
        w, h = int(rng.integers(60, 200)), int(rng.integers(60, 200))
        m = int(rng.integers(0, 6))
        cls = rng.choice(nc, m, p=[0.4, 0.3, 0.25, 0.05]).astype(float)
        wh = rng.uniform(0.05, 0.5, (m, 2))
        c = rng.uniform(wh / 2, 1 - wh / 2)
        xyxy = np.concatenate([(c - wh / 2) * [w, h], (c + wh / 2) * [w, h]], 1)
        f = f"/data/images/val/{i:05d}.png"
        labels.append({"im_file": f, "shape": (h, w), "cls": cls, "bboxes": np.concatenate([c, wh], 1)})
        targets.append(torch.tensor(np.concatenate([cls[:, None], xyxy], 1)))
        rows = []
        for k in range(m):
            for _ in range(int(rng.integers(0, 3))):
                box = xyxy[k] + rng.normal(0, rng.uniform(0.5, 8), 4)
                box[2:] = np.maximum(box[2:], box[:2] + 1)
                pc = cls[k] if rng.random() < 0.85 else rng.integers(0, nc)
                rows.append([*box, rng.random(), pc])
        for _ in range(int(rng.integers(0, 4))):
            a = rng.uniform(0, 1, 2) * [w, h]
            rows.append([*a, *(a + rng.uniform(5, 60, 2)), rng.random() * 0.7, rng.integers(0, nc)])
        preds.append(torch.tensor(rows, dtype=torch.float32).reshape(-1, 6))
        files.append(f)
    return labels, preds, targets, files


def _pycocotools(gt_json, dt_json, max_dets=1000):
    """mAP50-95 and mAP50 straight from COCOeval's precision table (area 'all', max_dets).

    COCO averages per category over categories with ground truth (entries of the others
    are -1); ``summarize()`` would read mAP50-95 at maxDets=100 only, so it is not used.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
        ev = COCOeval(gt, gt.loadRes(str(dt_json)), "bbox")
        ev.params.maxDets = [1, 10, max_dets]
        ev.params.areaRng = [[0, 1e10]]
        ev.params.areaRngLbl = ["all"]
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][:, :, :, 0, -1]  # (iou, recall, category)
    return prec[prec > -1].mean(), prec[0][prec[0] > -1].mean()


@pytest.mark.parametrize("seed", range(5))
def test_map_agrees_with_pycocotools(tmp_path, seed):
    labels, preds, targets, files = _random_split(seed)
    metrics = DetMetrics(NAMES)
    metrics.update(preds, targets, files)
    res = metrics.compute()
    gt_json = write_coco_labels(tmp_path / "gt.json", labels, NAMES)
    dt_json = write_coco_predictions(tmp_path / "dt.json", preds, files)
    coco_map, coco_map50 = _pycocotools(gt_json, dt_json)
    assert 0.05 < coco_map < 0.95  # a non-trivial case
    assert res["metrics/mAP50-95(B)"] == pytest.approx(coco_map, abs=0.005)
    assert res["metrics/mAP50(B)"] == pytest.approx(coco_map50, abs=0.005)
    assert coco_eval(gt_json, dt_json) == pytest.approx({"map": coco_map, "map50": coco_map50}, abs=1e-9)


def test_coco_files_have_the_coco_layout(tmp_path):
    labels, preds, _, files = _random_split(0, n_img=3)
    gt = json.loads(write_coco_labels(tmp_path / "gt.json", labels, NAMES).read_text())
    assert [c["id"] for c in gt["categories"]] == [0, 1, 2, 3]
    assert gt["images"][1] == {"id": 1, "file_name": "00001.png", "width": labels[1]["shape"][1],
                               "height": labels[1]["shape"][0]}
    ann = gt["annotations"][0]
    x, y, w, h = ann["bbox"]
    assert ann["iscrowd"] == 0 and ann["area"] == pytest.approx(w * h)
    cx, cy, bw, bh = labels[ann["image_id"]]["bboxes"][0]
    H, W = labels[ann["image_id"]]["shape"]
    assert (x + w / 2, y + h / 2, w, h) == pytest.approx((cx * W, cy * H, bw * W, bh * H))
    dt = json.loads(write_coco_predictions(tmp_path / "dt.json", preds, files).read_text())
    first = next(p for p in preds if len(p))
    x1, y1, x2, y2, s, c = first[0].tolist()
    assert dt[0]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=1e-3)
    assert dt[0]["score"] == pytest.approx(s, abs=1e-5) and dt[0]["category_id"] == int(c)
    assert coco_image_id("a/images/000123.png") == 123 and coco_image_id("x.jpg") == coco_image_id("y/x.png")
    with pytest.raises(UserError, match="same COCO image id"):
        write_coco_predictions(tmp_path / "d.json", [preds[0], preds[0]], ["a/1.png", "b/1.png"])


# ----------------------------------------------------------------------------- matching
def test_matching_follows_confidence_order_like_coco():
    # one target; the confident prediction overlaps it less than the second one does
    iou = torch.tensor([[0.62, 0.91]])
    tp = match_predictions(torch.tensor([0.0, 0.0]), torch.tensor([0.0]), iou, conf=torch.tensor([0.9, 0.8]))
    thr = np.linspace(0.5, 0.95, 10)
    assert tp.dtype == torch.bool and tp.shape == (2, 10)
    assert tp[0].tolist() == (thr <= 0.62).tolist()  # the confident one wins where it qualifies
    assert tp[1].tolist() == ((thr > 0.62) & (thr <= 0.91)).tolist()  # the other takes the rest
    # other class never matches; a numpy call returns numpy
    tp2 = match_predictions(np.array([1, 0]), np.array([0]), np.array([[0.99, 0.4]]))
    assert isinstance(tp2, np.ndarray) and not tp2.any()


def test_ap_and_best_f1_on_a_hand_built_case():
    # two targets of class 0; a TP at conf .9 and a FP at conf .8
    res = ap_per_class(np.array([[True] * 10, [False] * 10]), np.array([0.9, 0.8]),
                       np.array([0, 0]), np.array([0, 0]))
    assert res["all_ap"][0, 0] == pytest.approx(51 / 101)  # precision 1 up to recall .5 (51 of 101 points)
    assert res["p"][0] == 1.0 and res["r"][0] == 0.5 and res["f1"][0] == pytest.approx(2 / 3)
    assert 0.8 < res["best_conf"] <= 0.9 and res["tp"][0] == 1 and res["fp"][0] == 0


def test_perfect_predictions_and_fitness():
    targets = [torch.tensor([[0, 10, 10, 50, 50], [2, 60, 20, 90, 70.0]])]
    preds = [torch.tensor([[10, 10, 50, 50, 0.9, 0], [60, 20, 90, 70, 0.8, 2.0]])]
    m = DetMetrics(NAMES, fitness_weights=(0.25, 0.25, 0.25, 0.25))
    m.update(preds, targets, ["a.png"])
    res = m.compute()
    assert m.metric_keys == ["metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)"]
    assert list(res) == list(m.keys()) == m.metric_keys + ["fitness"]  # keys() is the dict's, as for a dict
    assert res == pytest.approx({k: 1.0 for k in res})
    assert m.box.ap_class_index.tolist() == [0, 2]
    assert m.box.maps.tolist() == pytest.approx([1.0] * 4) and m.maps.tolist() == m.box.maps.tolist()
    box = Metric()
    box.p, box.r, box.f1, box.all_ap = np.array([np.nan]), np.array([0.5]), np.array([0.5]), np.full((1, 10), 0.3)
    assert box.fitness() == pytest.approx(0.3) and box.fitness((1, 1, 0, 0)) == pytest.approx(0.5)


def test_image_metrics_on_a_hand_built_case():
    m = DetMetrics(NAMES, conf=0.25)
    targets = [torch.tensor([[0, 0, 0, 10, 10], [1, 20, 20, 30, 30.0]]), torch.zeros(0, 5), torch.zeros(0, 5)]
    preds = [torch.tensor([[0, 0, 10, 10, 0.9, 0],        # TP
                           [50, 50, 60, 60, 0.8, 0],      # FP
                           [20, 20, 30, 30, 0.1, 1.0]]),  # would be TP, but below conf
             torch.zeros(0, 6),
             torch.tensor([[0, 0, 5, 5, 0.5, 3.0]])]
    m.update(preds, targets, ["a.png", "empty.png", "fp.png"])
    m.compute()
    im = m.box.image_metrics
    assert im["a.png"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "tp": 1, "fp": 1, "fn": 1}
    assert im["empty.png"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 0, "fp": 0, "fn": 0}
    assert im["fp.png"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 1, "fn": 0}


def test_per_class_values_survive_the_wire_and_rebuild_the_object():
    """What model.train() returns on the driver is rebuilt from the final evaluation's record: every
    per-class array and mean must come back exactly, through the wire row and the Parquet event log."""
    from callbacks.sinks.event_parts import rows_table
    from trainers.events import make_row

    labels, preds, targets, files = _random_split(3)
    worker = DetMetrics(NAMES, fitness_weights=(0.1, 0.1, 0.3, 0.5))
    worker.update(preds, targets, files)
    worker.compute()
    worker.keep_extra({**worker.results_dict, "val/box_loss": 1.5})
    record = {**worker.results_dict, **worker.per_class_results()}
    assert len(worker.per_class_results()) == 13 * len(worker.box.ap_class_index)
    row = make_row("on_fit_epoch_end", {"metrics": record, "final_eval": True})
    (sent,) = rows_table([0], [0], [0], [row]).to_pylist()
    driver = DetMetrics(NAMES, fitness_weights=(0.1, 0.1, 0.3, 0.5))
    driver.restore(dict(sent["metrics"]))
    for name in ("p", "r", "f1", "ap50", "ap", "all_ap", "ap_class_index"):
        assert np.array_equal(getattr(driver.box, name), getattr(worker.box, name)), name
    assert driver.results_dict == worker.results_dict and driver.extra == {"val/box_loss": 1.5}
    assert driver.box.map == driver["metrics/mAP50-95(B)"] > 0.05 and driver.fitness == worker.fitness
    assert driver.box.map75 == worker.box.map75 and driver.summary()[0]["map"] == worker.summary()[0]["map"]


def test_state_merge_matches_single_process():
    labels, preds, targets, files = _random_split(7)
    whole = DetMetrics(NAMES)
    whole.update(preds, targets, files)
    expected = whole.compute()
    ranks = [DetMetrics(NAMES), DetMetrics(NAMES)]
    ranks[0].update(preds[0::2], targets[0::2], files[0::2])
    ranks[1].update(preds[1::2] + preds[:1], targets[1::2] + targets[:1], files[1::2] + files[:1])  # padding dup
    ranks[0].merge([r.state() for r in ranks])  # its own state included: no double counting
    assert ranks[0].compute() == pytest.approx(expected)
    assert ranks[0].nt_per_class.tolist() == whole.nt_per_class.tolist()


def test_plots_are_pngs(tmp_path):
    _, preds, targets, files = _random_split(1)
    m = DetMetrics(NAMES)
    m.update(preds, targets, files)
    m.compute()
    written = m.plot(tmp_path)
    assert sorted(p.name for p in written) == ["F1_curve.png", "PR_curve.png", "P_curve.png", "R_curve.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


# ----------------------------------------------------------------------------- confusion
def test_confusion_matrix_counts(tmp_path):
    cm = ConfusionMatrix(nc=3, conf=0.25, iou=0.45, names=["a", "b", "c"])
    targets = torch.tensor([[0, 0, 0, 10, 10], [1, 20, 20, 30, 30], [2, 40, 40, 50, 50.0]])
    dets = torch.tensor([[0, 0, 10, 10, 0.9, 0],       # right class -> [0, 0]
                         [20, 20, 30, 31, 0.8, 2],     # wrong class on target 1 -> [2, 1]
                         [70, 70, 80, 80, 0.7, 1],     # nothing there -> [1, bg]
                         [40, 40, 50, 50, 0.1, 2.0]])  # below conf: target 2 missed -> [bg, 2]
    cm.update(dets, targets)
    cm.update(None, torch.tensor([[0, 1, 1, 5, 5.0]]))  # another missed target of class 0
    expected = np.zeros((4, 4), int)
    expected[0, 0] = expected[2, 1] = expected[1, 3] = expected[3, 2] = 1
    expected[3, 0] = 1
    assert cm.matrix.tolist() == expected.tolist()
    tp, fp = cm.tp_fp()
    assert tp.tolist() == [1, 0, 0] and fp.tolist() == [0, 1, 1]
    other = ConfusionMatrix(nc=3)
    other.update(dets[:1], targets[:1])
    cm.merge([other])
    assert cm.matrix[0, 0] == 2
    for normalize in (True, False):
        png = cm.plot(tmp_path, normalize=normalize)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
