"""Classification data: the ``digits`` scikit-learn ships (read without importing it), or a folder per class."""
from __future__ import annotations

import importlib.util
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


DIGITS_VAL_FRACTION = 0.2  # of each class, held out


def load_digits_split(imgsz: int, seed: int = 0, val_fraction: float = DIGITS_VAL_FRACTION) -> dict:
    """The 1,797 8x8 digits as 1-channel images; a fixed stratified held-out split (seed 0)."""
    images, labels = read_digits()
    idx_train, idx_val = stratified_split(labels, val_fraction, seed)
    images = torch.from_numpy((images * (255.0 / 16.0)).round().astype(np.uint8)).reshape(-1, 1, 8, 8)
    labels = torch.from_numpy(labels)
    return {"train": TensorImages(images[idx_train], labels[idx_train], imgsz, augment=True),
            "val": TensorImages(images[idx_val], labels[idx_val], imgsz),
            "nc": 10, "names": {i: str(i) for i in range(10)}, "ch": 1}


def digits_file() -> Path:
    """The digits CSV inside the installed scikit-learn, found without importing it."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the 'digits' dataset needs scikit-learn installed (pip install scikit-learn)")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """(pixels 0..16 as (N, 64), labels) from the CSV file scikit-learn ships.

    Read directly: importing scikit-learn to load it costs ~1 s of every worker's start-up.
    """
    table = np.loadtxt(digits_file(), delimiter=",", dtype=np.float64)
    return table[:, :-1], table[:, -1].astype(np.int64)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: each class shuffled with ``seed`` and its first ``val_fraction`` held out."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_val = int(round(len(idx) * val_fraction))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def folder_layout(root: Path) -> tuple[Path, Path, list[str]]:
    """``root``'s train and val (or test) folders and its classes (the train folder's, sorted);
    names what is missing. Cheap: the driver checks it before a run is made."""
    train_dir, val_dir = root / "train", root / ("val" if (root / "val").is_dir() else "test")
    if not train_dir.is_dir() or not val_dir.is_dir():
        raise UserError(f"dataset folder {root} needs train/ and val/ subfolders with one folder per class")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"dataset folder {train_dir} holds no class folders")
    return train_dir, val_dir, classes


def load_folder_split(root: Path, imgsz: int) -> dict:
    """``root/{train,val}/<class>/*.png``."""
    train_dir, val_dir, classes = folder_layout(Path(root))
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
    if data in (None, "", "digits"):
        return
    if str(data).endswith((".yaml", ".yml")):
        raise UserError(f"data={data} is a detection data YAML, not a classification data set: give digits or a "
                        f"folder with train/ and val/ class folders, or a detection model (model=det-n.yaml)")
    if not Path(data).exists():
        raise UserError(f"dataset {data!r} not found: give 'digits' or a folder with train/ and val/ class folders")
    folder_layout(Path(data))


def load_classification_data(data: str | None, imgsz: int, seed: int = 0) -> dict:
    check_classification_data(data)
    if data in (None, "", "digits"):
        return load_digits_split(imgsz)
    return load_folder_split(Path(data), imgsz)
