"""ClassificationValidator: top-1/top-5 over all ranks."""
from __future__ import annotations

from trainers.data.classify import collate, load_classification_data
from trainers.data.loader import build_dataloader
from trainers.engine.distributed import gather_objects
from trainers.engine.validator import BaseValidator
from trainers.metrics.classify import ClassifyMetrics, topk_correct
from trainers.utils import UserError


class ClassificationValidator(BaseValidator):
    metric_keys = ClassifyMetrics.metric_keys

    def build_dataloader(self):
        """``args.split`` of the data, never augmented (the train split is, for training)."""
        data = load_classification_data(self.args.data, self.args.imgsz, self.args.seed)
        if self.args.split not in ("train", "val"):
            raise UserError(f"config key 'split': value {self.args.split!r} is not valid (a classification data "
                            f"set has the splits train and val)")
        dataset = data[self.args.split]
        dataset.augment = False
        rank, world = self.rank_world
        return build_dataloader(dataset, self.args.batch, self.args.workers, "val", rank, world, collate_fn=collate)

    def init_metrics(self, model) -> None:
        self.metrics = ClassifyMetrics()
        self.counts = [0, 0, 0]  # top1 right, top5 right, seen

    def preprocess(self, batch: dict) -> dict:
        batch = super().preprocess(batch)
        batch["img"] = batch["img"].float() / 255
        return batch

    def update_metrics(self, preds, batch) -> None:
        top1, top5 = topk_correct(preds, batch["cls"])
        self.counts = [self.counts[0] + top1, self.counts[1] + top5, self.counts[2] + len(batch["cls"])]

    def get_stats(self) -> dict:
        totals = [sum(c) for c in zip(*gather_objects(self.counts))]
        self.metrics.process(*totals)
        return self.metrics.own_results()

