"""DetectionValidator: NMS, COCO-correct box metrics over all ranks, plots and COCO JSON."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trainers.data.augment import unletterbox_boxes
from trainers.detect.data import detection_loader, load_detection_data
from trainers.engine.distributed import gather_objects
from trainers.engine.validator import BaseValidator
from trainers.metrics.coco import coco_prediction_records, write_coco_labels
from trainers.metrics.detection import METRIC_KEYS, ConfusionMatrix, DetMetrics
from trainers.utils import LOGGER
from trainers.utils.ops import non_max_suppression, xywh2xyxy

VAL_CONF = 0.001  # keep nearly every detection: AP needs the whole precision-recall curve
REPORT_CONF = 0.25  # confidence of the confusion matrix and per-image metrics
DEFAULT_FITNESS = (0.0, 0.0, 0.0, 1.0)  # over [P, R, mAP50, mAP50-95]


class DetectionValidator(BaseValidator):
    """Scores boxes in original-image pixels, so the figures match pycocotools on the same files."""

    metric_keys = tuple(METRIC_KEYS)

    def __init__(self, dataloader=None, save_dir=None, args=None, _callbacks=None):
        super().__init__(dataloader, save_dir, args, _callbacks)
        self.names: dict[int, str] = {}
        self.confusion_matrix = None
        self.jdict: list[dict] = []

    # ------------------------------------------------------------------ data
    def build_dataloader(self):
        data = load_detection_data(self.args, splits=(self.args.split,), augment_train=False)
        self.names = data["names"]
        rank, world = self.rank_world
        return detection_loader(data[self.args.split], self.args.batch, self.args.workers, "val", rank, world)

    def preprocess(self, batch: dict) -> dict:
        batch = super().preprocess(batch)
        batch["img"] = batch["img"].float() / 255
        return batch

    # ------------------------------------------------------------------ metrics
    def init_metrics(self, model) -> None:
        self.names = dict(self.names or getattr(model, "names", {}) or {i: str(i) for i in range(model.nc)})
        report_conf = REPORT_CONF if self.args.conf is None else self.args.conf
        self.metrics = DetMetrics(self.names, conf=report_conf,
                                  fitness_weights=self.args.fitness_weights or DEFAULT_FITNESS)
        self.confusion_matrix = ConfusionMatrix(len(self.names), conf=report_conf, names=self.names)
        self.jdict = []

    def postprocess(self, preds):
        decoded = preds[0] if isinstance(preds, (tuple, list)) else preds
        conf = VAL_CONF if self.args.conf is None else self.args.conf
        return non_max_suppression(decoded, conf=conf, iou=self.args.iou, max_det=self.args.max_det)

    def update_metrics(self, preds, batch) -> None:
        """Move predictions and labels back to original pixels, then match them per image."""
        h, w = batch["img"].shape[2:]
        scale = torch.tensor([w, h, w, h], device=batch["bboxes"].device)
        preds_o, targets_o = [], []
        for i, pred in enumerate(preds):
            ratio_pad, shape = batch["ratio_pad"][i], batch["ori_shape"][i]
            sel = batch["batch_idx"] == i
            boxes = unletterbox_boxes(xywh2xyxy(batch["bboxes"][sel] * scale), ratio_pad, shape)
            targets_o.append(torch.cat([batch["cls"][sel].view(-1, 1), boxes], 1).cpu())
            pred = pred.detach().cpu().clone()
            pred[:, :4] = unletterbox_boxes(pred[:, :4], ratio_pad, shape)
            preds_o.append(pred)
            self.confusion_matrix.update(pred, targets_o[-1])
        self.metrics.update(preds_o, targets_o, batch["im_file"])
        if self.args.save_json:
            for pred, im_file in zip(preds_o, batch["im_file"]):
                self.jdict += coco_prediction_records(pred, im_file)

    def get_stats(self) -> dict:
        """Merge every rank's matches, then compute; rank 0 writes plots and JSON."""
        self.metrics.merge(gather_objects(self.metrics.state()))
        self.confusion_matrix.matrix = np.sum(gather_objects(self.confusion_matrix.matrix), axis=0)
        records = gather_objects(self.jdict) if self.args.save_json else []
        stats = self.metrics.compute()
        if self.rank_world[0] in (-1, 0):
            if self.args.plots:  # every validation (plots=False skips the seconds they cost on a CPU)
                self.save_plots()
            if self.args.save_json:
                self.save_json([r for part in records for r in part])
            if not self.training and self.args.verbose:
                self.print_results()
        return stats

    # ------------------------------------------------------------------ outputs
    def save_plots(self) -> None:
        """PR/F1/P/R curves and the confusion matrix; ``self.plots`` names them for the sinks."""
        self.save_dir.mkdir(parents=True, exist_ok=True)
        files = self.metrics.plot(self.save_dir) + [self.confusion_matrix.plot(self.save_dir, normalize=True)]
        self.plots = {Path(f).name: str(f) for f in files}

    def save_json(self, records: list[dict]) -> None:
        """``predictions.json`` (COCO results) and ``labels.json`` (COCO ground truth) in ``save_dir``."""
        import json

        self.save_dir.mkdir(parents=True, exist_ok=True)
        pred_file = self.save_dir / "predictions.json"
        pred_file.write_text(json.dumps(records))
        self.plots["predictions.json"] = str(pred_file)
        labels = getattr(self.dataloader.dataset, "labels", None)
        if labels is None:
            LOGGER.warning("labels.json not written: the validation dataset has no YOLO 'labels' records")
            return
        self.plots["labels.json"] = str(write_coco_labels(self.save_dir / "labels.json", labels, self.names))

    def print_results(self) -> None:
        """One line for all classes, then one per class."""
        nt = self.metrics.nt_per_class
        row = "{:>12} {:>8} {:>8} {:>8} {:>8} {:>8}"
        lines = [row.format("class", "labels", "P", "R", "mAP50", "mAP50-95"),
                 row.format("all", int(nt.sum()), *(f"{v:.3f}" for v in self.metrics.mean_results()))]
        for s in self.metrics.summary():
            lines.append(row.format(s["name"], s["instances"], *(f"{s[k]:.3f}" for k in ("p", "r", "map50", "map"))))
        LOGGER.info("\n".join(lines))
