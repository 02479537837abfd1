"""Classification data: scikit-learn's bundled ``digits``, or a folder per class."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from trainers.data.sources import IMAGE_SUFFIXES, read_image
from trainers.utils import UserError


class TensorImages(Dataset):
    """Images held in memory as uint8 (N, C, H, W) with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, imgsz: int, augment: bool = False):
        self.images = resize_uint8(images, imgsz)
        self.labels = labels.long()
        self.augment = augment

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = self.images[i]
        if self.augment:  # a random shift of up to 1/8 of the image keeps digits learnable
            pad = max(img.shape[-1] // 8, 1)
            dx, dy = np.random.randint(-pad, pad + 1, size=2)
            img = torch.roll(img, shifts=(int(dy), int(dx)), dims=(1, 2))
        return {"img": img, "cls": self.labels[i]}


def resize_uint8(images: torch.Tensor, imgsz: int) -> torch.Tensor:
    if images.shape[-1] == imgsz and images.shape[-2] == imgsz:
        return images
    x = F.interpolate(images.float(), size=(imgsz, imgsz), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def collate(items: list[dict]) -> dict:
    return {"img": torch.stack([it["img"] for it in items]), "cls": torch.stack([it["cls"] for it in items])}


def load_digits_split(imgsz: int, seed: int = 0, val_fraction: float = 0.2) -> dict:
    """The 1,797 8x8 digits as 1-channel images; a fixed stratified held-out split (seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy((digits.images * (255.0 / 16.0)).round().astype(np.uint8))[:, None]
    labels = torch.from_numpy(digits.target)
    idx_train, idx_val = train_test_split(np.arange(len(labels)), test_size=val_fraction,
                                          random_state=seed, stratify=digits.target)
    return {"train": TensorImages(images[idx_train], labels[idx_train], imgsz, augment=True),
            "val": TensorImages(images[idx_val], labels[idx_val], imgsz),
            "nc": 10, "names": {i: str(i) for i in range(10)}, "ch": 1}


def load_folder_split(root: Path, imgsz: int) -> dict:
    """``root/{train,val}/<class>/*.png``: class names from the train folder, sorted."""
    root = Path(root)
    train_dir, val_dir = root / "train", root / ("val" if (root / "val").is_dir() else "test")
    if not train_dir.is_dir() or not val_dir.is_dir():
        raise UserError(f"dataset folder {root} needs train/ and val/ subfolders with one folder per class")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"dataset folder {train_dir} holds no class folders")
    names = dict(enumerate(classes))
    return {"train": _folder_images(train_dir, classes, imgsz, augment=True),
            "val": _folder_images(val_dir, classes, imgsz), "nc": len(classes), "names": names, "ch": 3}


def _folder_images(split_dir: Path, classes: list[str], imgsz: int, augment: bool = False) -> TensorImages:
    images, labels = [], []
    for label, name in enumerate(classes):
        folder = split_dir / name
        files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        for f in files:
            arr = torch.from_numpy(read_image(f)).permute(2, 0, 1)[None]
            images.append(resize_uint8(arr, imgsz)[0])
            labels.append(label)
    if not images:
        raise UserError(f"dataset split {split_dir} holds no images in its class folders")
    return TensorImages(torch.stack(images), torch.tensor(labels), imgsz, augment=augment)


def check_classification_data(data: str | None) -> None:
    if data not in (None, "", "digits") and not Path(data).exists():
        raise UserError(f"dataset {data!r} not found: give 'digits' or a folder with train/ and val/ class folders")


def load_classification_data(data: str | None, imgsz: int, seed: int = 0) -> dict:
    check_classification_data(data)
    if data in (None, "", "digits"):
        return load_digits_split(imgsz)
    return load_folder_split(Path(data), imgsz)
