"""DetectionTrainer: YOLO-layout data (or the built-in shapes8), an anchor-free detector from a YAML spec."""
from __future__ import annotations

from trainers.detect.data import check_detection_data, detection_loader, load_detection_data
from trainers.detect.val import DetectionValidator
from trainers.engine.trainer import BaseTrainer
from trainers.models.tasks import DetectionModel
from trainers.utils import unwrap_model


class DetectionTrainer(BaseTrainer):
    task = "detect"
    default_imgsz = 96
    imgsz_multiple = 32  # the largest stride of the built-in specs (P3-P5: 8, 16, 32)

    @classmethod
    def preflight(cls, args) -> None:
        if not args.resume:  # a resumed run takes its data from the checkpoint
            check_detection_data(args.data)

    def get_dataset(self) -> dict:
        return load_detection_data(self.args)

    def get_model(self, cfg=None, weights=None, verbose=True):
        model = DetectionModel(cfg or "det-n.yaml", nc=self.data["nc"], verbose=verbose)
        if weights is not None:
            model.load(weights, verbose=verbose)
        return model

    def get_dataloader(self, dataset_path, batch_size=16, rank=0, mode="train"):
        return detection_loader(dataset_path, batch_size, self.args.workers, mode, rank, self.world_size,
                                seed=self.args.seed)

    def preprocess_batch(self, batch: dict) -> dict:
        batch = super().preprocess_batch(batch)
        batch["img"] = batch["img"].float() / 255
        return batch

    def get_validator(self):
        self.loss_names = tuple(getattr(unwrap_model(self.model), "loss_names", self.loss_names))
        return DetectionValidator(self.test_loader, self.save_dir, self.args, _callbacks=self.callbacks)
