"""COCO-format JSON for a split's ground truth and for predictions, and a pycocotools check.

Category ids are the dataset's class indices (0-based). Image ids come from the file name:
the stem itself when it is a number (``000123.png`` -> 123), else a stable CRC32 of the stem,
so labels and predictions written separately (or by different ranks) always agree.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch

from trainers.utils import UserError


def coco_image_id(im_file) -> int:
    """Stable integer id of an image, derived from its file name only."""
    stem = Path(str(im_file)).stem
    return int(stem) if stem.isdigit() else zlib.crc32(stem.encode()) & 0x7FFFFFFF


def _ids(im_files) -> list[int]:
    """Ids for ``im_files``; two different files with one id are a user error."""
    seen: dict[int, str] = {}
    out = []
    for f in im_files:
        i = coco_image_id(f)
        if seen.setdefault(i, str(f)) != str(f):
            raise UserError(f"images {seen[i]} and {f} map to the same COCO image id {i}; rename one")
        out.append(i)
    return out


def write_coco_labels(path, labels, names) -> Path:
    """Write a split's ground truth as a COCO dataset JSON.

    ``labels`` are records with ``im_file``, ``shape`` ``(h, w)``, ``cls`` ``(m,)`` and
    ``bboxes`` ``(m, 4)`` normalized xywh (``YOLODataset.labels`` has this form).
    """
    labels = list(labels)
    names = dict(enumerate(names)) if isinstance(names, (list, tuple)) else dict(names)
    images, annotations = [], []
    for rec, image_id in zip(labels, _ids(r["im_file"] for r in labels)):
        h, w = (int(v) for v in rec["shape"])
        images.append({"id": image_id, "file_name": Path(rec["im_file"]).name, "width": w, "height": h})
        for c, box in zip(np.asarray(rec["cls"]).reshape(-1), np.asarray(rec["bboxes"]).reshape(-1, 4)):
            bw, bh = float(box[2]) * w, float(box[3]) * h
            x, y = float(box[0]) * w - bw / 2, float(box[1]) * h - bh / 2
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(c),
                                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
    categories = [{"id": int(i), "name": str(n), "supercategory": ""} for i, n in sorted(names.items())]
    return _dump(path, {"info": {"description": "ground truth written by trainers.metrics.coco"},
                        "images": images, "annotations": annotations, "categories": categories})


def coco_prediction_records(pred, im_file) -> list[dict]:
    """COCO result records of one image; ``pred`` is ``(n, 6)`` xyxy, conf, cls in original pixels."""
    p = torch.as_tensor(pred).detach().to("cpu", torch.float64).reshape(-1, 6).tolist()
    image_id = coco_image_id(im_file)
    return [{"image_id": image_id, "category_id": int(c),
             "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
             "score": round(s, 5)} for x1, y1, x2, y2, s, c in p]


def write_coco_predictions(path, preds, im_files) -> Path:
    """Write predictions in the COCO results format (a JSON list of records).

    ``preds[i]`` is ``(n, 6)`` xyxy, conf, cls in the ORIGINAL pixels of ``im_files[i]``
    (undo the letterbox first, e.g. with ``trainers.data.augment.unletterbox_boxes``).
    """
    im_files = list(im_files)
    if len(preds) != len(im_files):
        raise ValueError(f"{len(preds)} prediction tensors for {len(im_files)} image files")
    _ids(im_files)
    records = [r for pred, f in zip(preds, im_files) for r in coco_prediction_records(pred, f)]
    return _dump(path, records)


def _dump(path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def coco_eval(labels_json, predictions_json, max_dets: int = 300) -> dict[str, float]:
    """mAP50-95 and mAP50 by pycocotools (bbox, all areas), when it is installed."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise UserError("save_json evaluation needs pycocotools: pip install pycocotools") from None
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(labels_json))
        records = json.loads(Path(predictions_json).read_text())
        if not records:
            return {"map": 0.0, "map50": 0.0}
        ev = COCOeval(gt, gt.loadRes(records), "bbox")
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
    # summarize() reads mAP50-95 at maxDets=100 only, so average the precision table directly
    prec = ev.eval["precision"][:, :, :, 0, -1]  # (iou, recall, class) at area "all", max_dets
    return {"map": _mean_valid(prec), "map50": _mean_valid(prec[0])}


def _mean_valid(p: np.ndarray) -> float:
    """COCO's average: entries of classes without ground truth are -1 and left out."""
    valid = p[p > -1]
    return float(valid.mean()) if valid.size else 0.0
