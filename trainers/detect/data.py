"""Resolve ``args.data`` for detection: the built-in ``shapes8.yaml`` or a data YAML path."""
from __future__ import annotations

from pathlib import Path

from trainers.data.loader import build_dataloader
from trainers.data.yolo import YOLODataset, load_data_yaml
from trainers.utils import UserError


def check_detection_data(data) -> dict:
    """The parsed data YAML (``shapes8.yaml`` is generated on first use); names a missing ``data``."""
    if not data:
        raise UserError("config key 'data' is required for detection: give shapes8.yaml or a data YAML path")
    if str(data) == "digits" or Path(str(data)).is_dir():
        raise UserError(f"data={data} is a classification data set (digits, or a folder of class folders), not a "
                        f"detection data YAML: give a data YAML, or a classification model (model=cls-n.yaml)")
    return load_data_yaml(data)


def load_detection_data(args, splits=("train", "val"), augment_train: bool = True) -> dict:
    """``{split: YOLODataset, "nc", "names", "yaml_file"}``; only the training split may augment."""
    info = check_detection_data(args.data)
    out = {"nc": info["nc"], "names": info["names"], "yaml_file": info["yaml_file"]}
    for split in splits:
        if not info.get(split):
            raise UserError(f"data YAML {info['yaml_file']} has no '{split}' split")
        augment = augment_train and split == "train"
        out[split] = YOLODataset(info[split], args.imgsz, augment=augment, strict=args.strict, hyp=args,
                                 nc=info["nc"])
    return out


def detection_loader(dataset, batch: int, workers: int, mode: str, rank: int, world_size: int, seed: int = 0):
    """Training shuffles per epoch (``set_epoch``); evaluation shards without padding."""
    return build_dataloader(dataset, batch, workers, mode, rank, world_size, seed=seed,
                            collate_fn=YOLODataset.collate_fn)
