"""Detection metrics that agree with pycocotools' COCOeval (bbox, area "all").

What makes them COCO-correct:
- matching per image and class, detections in descending confidence, each taking the
  unmatched ground truth of highest IoU >= threshold (IoU thresholds 0.50:0.05:0.95);
- AP per class from the precision envelope read at 101 recall points with a step lookup
  (no linear interpolation, no trapezoid), averaged over those points;
- mAP = mean over classes that have ground truth; classes without any are left out.
P, R and F1 are reported at the single confidence that maximizes the mean F1 over classes.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import torch

from trainers.metrics.base import PER_CLASS, TaskMetrics
from trainers.utils.ops import box_iou

IOUV = np.linspace(0.5, 0.95, 10)  # same float64 values as COCOeval.params.iouThrs
RECALL_GRID = np.linspace(0.0, 1.0, 101)  # COCOeval.params.recThrs
CONF_GRID = np.linspace(0.0, 1.0, 1000)  # where P/R/F1-vs-confidence curves are sampled
METRIC_KEYS = ["metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)"]
# A class's values as a record carries them: P, R, F1 and the AP at each IoU threshold (ap50 .. ap95).
CLASS_FIELDS = ("p", "r", "f1", *(f"ap{round(t * 100)}" for t in IOUV))
BOX_PREFIX = f"{PER_CLASS}box/"  # per_class/box/<class id>/<field>


# ----------------------------------------------------------------------------- matching
def match_predictions(pred_cls, true_cls, iou, iouv=None, conf=None):
    """TP matrix ``(n_pred, len(iouv))``: is prediction j a true positive at threshold t?

    ``iou`` is ``(n_true, n_pred)`` (ground truth rows, predictions columns). Predictions
    are taken in descending ``conf`` when given, otherwise in the order given (NMS output
    is already sorted by confidence). Returns a bool tensor on ``pred_cls``'s device when
    the inputs are tensors, else a numpy array.
    """
    as_tensor = isinstance(pred_cls, torch.Tensor)
    device = pred_cls.device if as_tensor else None
    pc, tc, io = (_np(x) for x in (pred_cls, true_cls, iou))
    thr = IOUV if iouv is None else _np(iouv).astype(np.float64)
    order = np.argsort(-_np(conf), kind="stable") if conf is not None else np.arange(len(pc))
    tp = _greedy_match(pc, tc, io.reshape(len(tc), len(pc)), thr, order)
    return torch.from_numpy(tp).to(device) if as_tensor else tp


def _greedy_match(pred_cls, true_cls, iou, iouv, order) -> np.ndarray:
    n, m, t = len(pred_cls), len(true_cls), len(iouv)
    tp = np.zeros((n, t), dtype=bool)
    if n == 0 or m == 0:
        return tp
    iou = np.where(true_cls[:, None] == pred_cls[None, :], iou.astype(np.float64), 0.0)
    taken = np.zeros((m, t), dtype=bool)
    cols = np.arange(t)
    for j in order:
        col = iou[:, j]
        if col.max() < iouv[0]:
            continue
        cand = np.where((col[:, None] >= iouv[None, :]) & ~taken, col[:, None], -1.0)
        best = cand.argmax(0)
        hit = cand[best, cols] >= 0
        tp[j] = hit
        taken[best[hit], cols[hit]] = True
    return tp


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# ----------------------------------------------------------------------------- AP
def coco_ap(tp_sorted: np.ndarray, n_gt: int):
    """AP of one class at one IoU threshold, and its precision at the 101 recall points.

    ``tp_sorted`` are the class's detections in descending confidence.
    """
    if n_gt == 0 or len(tp_sorted) == 0:
        return 0.0, np.zeros(len(RECALL_GRID))
    tpc = np.cumsum(tp_sorted, dtype=np.float64)
    fpc = np.cumsum(~tp_sorted, dtype=np.float64)
    recall = tpc / n_gt
    precision = tpc / (tpc + fpc + np.spacing(1))
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the envelope
    idx = np.searchsorted(recall, RECALL_GRID, side="left")
    q = np.zeros(len(RECALL_GRID))
    ok = idx < len(precision)
    q[ok] = precision[idx[ok]]
    return float(q.mean()), q


def ap_per_class(tp, conf, pred_cls, target_cls, eps: float = 1e-16) -> dict:
    """Per-class AP at every IoU threshold plus P/R/F1 at the best mean-F1 confidence.

    Classes are those with ground truth (sorted). Returns a dict with ``classes``,
    ``all_ap`` ``(nc, T)``, ``p``, ``r``, ``f1``, ``tp``, ``fp`` (at ``best_conf``),
    ``best_conf`` and ``curves`` (``px`` confidence grid with ``p``/``r``/``f1`` curves,
    ``recall`` grid with the IoU-0.5 ``precision`` curve for PR plots).
    """
    tp, conf = np.asarray(tp, dtype=bool).reshape(len(conf), -1), np.asarray(conf, dtype=np.float64)
    pred_cls, target_cls = np.asarray(pred_cls).astype(np.int64), np.asarray(target_cls).astype(np.int64)
    order = np.argsort(-conf, kind="stable")
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]
    classes, n_gt = np.unique(target_cls, return_counts=True)
    nc, nt = len(classes), tp.shape[1]
    all_ap, pr_curve = np.zeros((nc, nt)), np.zeros((nc, len(RECALL_GRID)))
    p_curve, r_curve = np.zeros((nc, len(CONF_GRID))), np.zeros((nc, len(CONF_GRID)))
    tp_at, kept_at = np.zeros((nc, len(CONF_GRID))), np.zeros((nc, len(CONF_GRID)))
    for ci, c in enumerate(classes):
        sel = pred_cls == c
        for t in range(nt):
            all_ap[ci, t], q = coco_ap(tp[sel, t], int(n_gt[ci]))
            if t == 0:
                pr_curve[ci] = q
        tp_at[ci], kept_at[ci] = _conf_counts(tp[sel, 0], conf[sel])
    p_curve = np.where(kept_at > 0, tp_at / np.maximum(kept_at, 1), 0.0)  # 0 where nothing kept
    r_curve = tp_at / np.maximum(n_gt, 1)[:, None]
    f1_curve = 2 * p_curve * r_curve / (p_curve + r_curve + eps)
    best = int(f1_curve.mean(0).argmax()) if nc else 0
    return {
        "classes": classes, "all_ap": all_ap, "p": p_curve[:, best], "r": r_curve[:, best],
        "f1": f1_curve[:, best], "tp": tp_at[:, best], "fp": kept_at[:, best] - tp_at[:, best],
        "best_conf": float(CONF_GRID[best]), "n_gt": n_gt,
        "curves": {"px": CONF_GRID, "p": p_curve, "r": r_curve, "f1": f1_curve,
                   "recall": RECALL_GRID, "precision": pr_curve},
    }


def _conf_counts(tp50: np.ndarray, conf: np.ndarray):
    """TP count and kept count when keeping detections with conf >= each grid value."""
    kept = np.searchsorted(-conf, -CONF_GRID, side="right")  # conf is descending
    tpc = np.concatenate([[0.0], np.cumsum(tp50, dtype=np.float64)])[kept]
    return tpc, kept.astype(np.float64)


# ----------------------------------------------------------------------------- results
class Metric:
    """Box metrics of one evaluation: per-class arrays (rows follow ``ap_class_index``) and means."""

    def __init__(self, nc: int = 0):
        self.nc = nc
        self.p = self.r = self.f1 = np.zeros(0)
        self.all_ap = np.zeros((0, len(IOUV)))
        self.ap_class_index = np.zeros(0, dtype=np.int64)
        self.tp = self.fp = np.zeros(0)
        self.best_conf = 0.0
        self.curves: dict = {}
        self.image_metrics: dict[str, dict] = {}

    def update(self, results: dict) -> None:
        """Take the output of ``ap_per_class``."""
        self.p, self.r, self.f1 = results["p"], results["r"], results["f1"]
        self.all_ap, self.ap_class_index = results["all_ap"], results["classes"]
        self.tp, self.fp, self.best_conf = results["tp"], results["fp"], results["best_conf"]
        self.curves = results["curves"]

    @property
    def ap50(self) -> np.ndarray:
        return self.all_ap[:, 0] if len(self.all_ap) else np.zeros(0)

    @property
    def ap(self) -> np.ndarray:
        """Per-class AP averaged over IoU 0.50:0.95."""
        return self.all_ap.mean(1) if len(self.all_ap) else np.zeros(0)

    @property
    def mp(self) -> float:
        return _mean(self.p)

    @property
    def mr(self) -> float:
        return _mean(self.r)

    @property
    def map50(self) -> float:
        return _mean(self.ap50)

    @property
    def map75(self) -> float:
        return _mean(self.all_ap[:, 5]) if len(self.all_ap) else 0.0

    @property
    def map(self) -> float:
        return _mean(self.ap)

    @property
    def maps(self) -> np.ndarray:
        """mAP50-95 for every class id in ``range(nc)``; classes not evaluated get the overall map."""
        out = np.full(self.nc, self.map)
        out[self.ap_class_index[self.ap_class_index < self.nc]] = self.ap[self.ap_class_index < self.nc]
        return out

    def mean_results(self) -> list[float]:
        return [self.mp, self.mr, self.map50, self.map]

    def class_result(self, i: int) -> tuple[float, float, float, float]:
        """``(p, r, ap50, ap)`` of row ``i`` (class ``ap_class_index[i]``)."""
        return float(self.p[i]), float(self.r[i]), float(self.ap50[i]), float(self.ap[i])

    def fitness(self, weights=(0.0, 0.0, 0.0, 1.0)) -> float:
        """Weighted sum over ``[mp, mr, map50, map]`` (NaN counts as 0)."""
        values = np.nan_to_num(np.array(self.mean_results(), dtype=np.float64))
        return float((values * np.asarray(weights, dtype=np.float64)).sum())

    def class_values(self) -> dict[str, float]:
        """``{"<class id>/<field>": value}`` (``CLASS_FIELDS``) for every evaluated class."""
        rows = np.column_stack([self.p, self.r, self.f1, self.all_ap]).reshape(-1, len(CLASS_FIELDS))
        return {f"{int(c)}/{field}": float(v)
                for c, row in zip(self.ap_class_index, rows) for field, v in zip(CLASS_FIELDS, row)}

    def load_class_values(self, values: dict) -> None:
        """The inverse of ``class_values``, rows in class order as ``ap_per_class`` makes them; a
        record carries no curves, tp/fp or image_metrics, so those stay empty."""
        ids = sorted({int(key.split("/")[0]) for key in values})
        rows = np.array([[values[f"{c}/{field}"] for field in CLASS_FIELDS] for c in ids], dtype=np.float64)
        rows = rows.reshape(len(ids), len(CLASS_FIELDS))
        self.p, self.r, self.f1, self.all_ap = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3:]
        self.ap_class_index = np.array(ids, dtype=np.int64)


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if len(x) else 0.0


class DetMetrics(TaskMetrics):
    """Accumulates per-image matches, then computes COCO-style box metrics; reads as its flat dict
    (``trainers.metrics.base``).

    Per batch: ``update(preds, targets, im_files)``; at the end ``compute()``. Under DDP each
    rank sends ``state()`` and one rank calls ``merge(states)`` before ``compute()``. Stats are
    keyed by image file, so merging a rank's own state again, or the duplicates a padded
    sampler adds, changes nothing.
    ``conf`` is the confidence threshold of ``box.image_metrics``.
    """

    def __init__(self, names=None, conf: float = 0.25, fitness_weights=(0.0, 0.0, 0.0, 1.0)):
        super().__init__()
        names = names or {}
        self.names = dict(enumerate(names)) if isinstance(names, (list, tuple)) else dict(names)
        self.conf = conf
        self.fitness_weights = tuple(fitness_weights)
        self.box = Metric(len(self.names))
        self._images: dict[str, tuple] = {}
        self._anon = itertools.count()

    @property
    def metric_keys(self) -> list[str]:
        """The four box metrics' names (Ultralytics' ``keys``: here ``keys()`` is the dict's)."""
        return list(METRIC_KEYS)

    # ---- accumulation
    def update(self, preds, targets, im_files=None) -> None:
        """Match one batch. ``preds[i]``: ``(n, 6)`` xyxy, conf, cls; ``targets[i]``: ``(m, 5)`` cls, xyxy."""
        if im_files is None:
            im_files = [f"<image {os.getpid()}-{id(self)}-{next(self._anon)}>" for _ in preds]
        if not len(preds) == len(targets) == len(im_files):
            raise ValueError(f"update() got {len(preds)} preds, {len(targets)} targets, {len(im_files)} files")
        for pred, target, im_file in zip(preds, targets, im_files):
            self._images[str(im_file)] = _match_image(pred, target)

    def state(self) -> dict:
        """Picklable accumulated stats (numpy only) for gathering across ranks."""
        return {"images": dict(self._images)}

    def merge(self, states) -> None:
        """Add other ranks' ``state()`` dicts (the same image twice counts once)."""
        for st in states:
            self._images.update(st["images"])

    def reset(self) -> None:
        self._images.clear()
        self.box = Metric(len(self.names))

    @property
    def stats(self) -> dict[str, np.ndarray]:
        """Concatenated ``tp``, ``conf``, ``pred_cls``, ``target_cls`` over all images so far."""
        rows = [self._images[k] for k in sorted(self._images)]
        return {
            "tp": np.concatenate([r[0] for r in rows]) if rows else np.zeros((0, len(IOUV)), bool),
            "conf": np.concatenate([r[1] for r in rows]) if rows else np.zeros(0),
            "pred_cls": np.concatenate([r[2] for r in rows]) if rows else np.zeros(0),
            "target_cls": np.concatenate([r[3] for r in rows]) if rows else np.zeros(0),
        }

    @property
    def nt_per_class(self) -> np.ndarray:
        """Ground-truth instances per class id (length ``nc``)."""
        tc = self.stats["target_cls"].astype(np.int64)
        return np.bincount(tc, minlength=len(self.names)) if len(tc) else np.zeros(len(self.names), int)

    def compute(self) -> dict:
        """Metrics over everything accumulated; returns ``own_results()``."""
        s = self.stats
        self.process(s["tp"], s["conf"], s["pred_cls"], s["target_cls"])
        self.box.image_metrics = {k: image_metrics(v, self.conf) for k, v in self._images.items()}
        return self.own_results()

    def process(self, tp, conf, pred_cls, target_cls) -> dict:
        """Compute ``box`` from raw arrays (``tp`` is ``(N, 10)``)."""
        self.box.update(ap_per_class(_np(tp), _np(conf), _np(pred_cls), _np(target_cls)))
        return self.own_results()

    # ---- results
    def mean_results(self) -> list[float]:
        return self.box.mean_results()

    def class_result(self, i: int):
        return self.box.class_result(i)

    @property
    def maps(self) -> np.ndarray:
        return self.box.maps

    @property
    def fitness(self) -> float:
        return self.box.fitness(self.fitness_weights)

    def own_results(self) -> dict[str, float]:
        return {**dict(zip(self.metric_keys, self.mean_results())), "fitness": self.fitness}

    def per_class_results(self) -> dict[str, float]:
        return {BOX_PREFIX + key: value for key, value in self.box.class_values().items()}

    def _restore(self, results: dict) -> None:
        n = len(BOX_PREFIX)
        self.box.load_class_values({k[n:]: v for k, v in results.items() if k.startswith(BOX_PREFIX)})

    def summary(self) -> list[dict]:
        """One row per evaluated class: name, instances, p, r, f1, map50, map."""
        nt = self.nt_per_class
        return [{"class": int(c), "name": self.names.get(int(c), str(c)),
                 "instances": int(nt[c]) if c < len(nt) else 0,
                 "p": float(self.box.p[i]), "r": float(self.box.r[i]), "f1": float(self.box.f1[i]),
                 "map50": float(self.box.ap50[i]), "map": float(self.box.ap[i])}
                for i, c in enumerate(self.box.ap_class_index)]

    def plot(self, save_dir, prefix: str = "") -> list[Path]:
        """PR curve and F1/P/R-vs-confidence curves as PNGs in ``save_dir``."""
        from trainers.metrics.plots import plot_metric_curve, plot_pr_curve

        c = self.box.curves
        if not c:
            return []
        names = [self.names.get(int(i), str(i)) for i in self.box.ap_class_index]
        d = Path(save_dir)
        files = [plot_pr_curve(c["recall"], c["precision"], self.box.ap50, names, d / f"{prefix}PR_curve.png")]
        for key, label, stem in (("f1", "F1", "F1"), ("p", "Precision", "P"), ("r", "Recall", "R")):
            files.append(plot_metric_curve(c["px"], c[key], names, d / f"{prefix}{stem}_curve.png", label))
        return files


def _match_image(pred, target) -> tuple:
    """``(tp (n, 10), conf, pred_cls, target_cls)`` for one image, in confidence order."""
    pred = torch.as_tensor(pred).detach().to("cpu", torch.float64).reshape(-1, 6)
    target = torch.as_tensor(target).detach().to("cpu", torch.float64).reshape(-1, 5)
    pred = pred[pred[:, 4].argsort(descending=True, stable=True)]
    iou = box_iou(target[:, 1:], pred[:, :4])  # (m, n), empty when either side is
    tp = _greedy_match(pred[:, 5].numpy(), target[:, 0].numpy(), iou.numpy(), IOUV, np.arange(len(pred)))
    return tp, pred[:, 4].numpy().copy(), pred[:, 5].numpy().copy(), target[:, 0].numpy().copy()


def image_metrics(stats: tuple, conf: float) -> dict:
    """Precision, recall, F1, TP, FP, FN of one image at IoU 0.5 and ``conf``.

    With no detections precision is 1 if there was nothing to find, else 0; with no ground
    truth recall is 1 if nothing was detected, else 0 (so an empty, empty-handed image scores 1).
    """
    tp, scores, _, target_cls = stats
    keep = scores >= conf
    ntp = int(tp[keep, 0].sum())
    nfp, nfn = int(keep.sum()) - ntp, len(target_cls) - ntp
    precision = ntp / (ntp + nfp) if ntp + nfp else float(nfn == 0)
    recall = ntp / (ntp + nfn) if ntp + nfn else float(nfp == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": ntp, "fp": nfp, "fn": nfn}


# ----------------------------------------------------------------------------- confusion
class ConfusionMatrix:
    """Class confusions at one confidence/IoU; rows = predicted, columns = true, last = background."""

    def __init__(self, nc: int, conf: float = 0.25, iou: float = 0.45, names=None):
        self.nc, self.conf, self.iou = nc, conf, iou
        names = names or {}
        names = dict(enumerate(names)) if isinstance(names, (list, tuple)) else dict(names)
        self.names = [names.get(i, str(i)) for i in range(nc)]
        self.matrix = np.zeros((nc + 1, nc + 1), dtype=np.int64)

    def update(self, detections, targets) -> None:
        """One image: ``detections`` ``(n, 6)`` xyxy, conf, cls (or None); ``targets`` ``(m, 5)`` cls, xyxy."""
        det = torch.as_tensor(detections if detections is not None else torch.zeros(0, 6))
        det = det.detach().to("cpu", torch.float64).reshape(-1, 6)
        det = det[det[:, 4] > self.conf]
        gt = torch.as_tensor(targets).detach().to("cpu", torch.float64).reshape(-1, 5)
        det_cls, gt_cls = det[:, 5].long().numpy(), gt[:, 0].long().numpy()
        bg = self.nc
        pairs = self._pairs(det, gt) if len(det) and len(gt) else []
        for d, g in pairs:
            self.matrix[det_cls[d], gt_cls[g]] += 1
        matched_d, matched_g = {d for d, _ in pairs}, {g for _, g in pairs}
        for g in range(len(gt)):
            if g not in matched_g:
                self.matrix[bg, gt_cls[g]] += 1
        for d in range(len(det)):
            if d not in matched_d:
                self.matrix[det_cls[d], bg] += 1

    def _pairs(self, det: torch.Tensor, gt: torch.Tensor) -> list[tuple[int, int]]:
        """One-to-one (detection, target) pairs with IoU > ``iou``, greedily by highest IoU."""
        iou = box_iou(gt[:, 1:], det[:, :4]).numpy()  # (m, n)
        g_idx, d_idx = np.nonzero(iou > self.iou)
        order = np.argsort(-iou[g_idx, d_idx], kind="stable")
        used_d, used_g, pairs = set(), set(), []
        for k in order:
            d, g = int(d_idx[k]), int(g_idx[k])
            if d not in used_d and g not in used_g:
                used_d.add(d)
                used_g.add(g)
                pairs.append((d, g))
        return pairs

    def tp_fp(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-class true and false positives (background excluded)."""
        tp = np.diag(self.matrix)[:-1]
        fp = self.matrix.sum(1)[:-1] - tp
        return tp, fp

    def merge(self, others) -> None:
        """Add other ranks' matrices (``ConfusionMatrix`` objects or arrays)."""
        for o in others:
            self.matrix += np.asarray(getattr(o, "matrix", o), dtype=np.int64)

    def plot(self, save_dir, normalize: bool = True) -> Path:
        """``confusion_matrix[_normalized].png`` in ``save_dir``; columns sum to 1 when normalized."""
        from trainers.metrics.plots import plot_confusion_matrix

        name = "confusion_matrix_normalized.png" if normalize else "confusion_matrix.png"
        return plot_confusion_matrix(self.matrix, self.names + ["background"], Path(save_dir) / name, normalize)
