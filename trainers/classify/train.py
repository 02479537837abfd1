"""ClassificationTrainer: digits or a folder per class, a small CNN from a YAML spec."""
from __future__ import annotations

from trainers.classify.val import ClassificationValidator
from trainers.data.classify import check_classification_data, collate, load_classification_data
from trainers.data.loader import build_dataloader
from trainers.engine.trainer import BaseTrainer
from trainers.models.tasks import ClassificationModel


class ClassificationTrainer(BaseTrainer):
    task = "classify"
    default_imgsz = 32

    @classmethod
    def preflight(cls, args) -> None:
        check_classification_data(args.data)

    def get_dataset(self) -> dict:
        return load_classification_data(self.args.data, self.args.imgsz, self.args.seed)

    def get_model(self, cfg=None, weights=None, verbose=True):
        model = ClassificationModel(cfg or "cls-n.yaml", ch=self.data["ch"], nc=self.data["nc"], verbose=verbose)
        if weights is not None:
            model.load(weights)
        return model

    def get_dataloader(self, dataset_path, batch_size=16, rank=0, mode="train"):
        return build_dataloader(dataset_path, batch_size, self.args.workers, mode, rank, self.world_size,
                                seed=self.args.seed, collate_fn=collate)

    def preprocess_batch(self, batch: dict) -> dict:
        batch = super().preprocess_batch(batch)
        batch["img"] = batch["img"].float() / 255
        return batch

    def get_validator(self):
        self.loss_names = ("loss",)
        return ClassificationValidator(self.test_loader, self.save_dir, self.args, _callbacks=self.callbacks)
