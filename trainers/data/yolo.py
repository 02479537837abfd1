"""YOLO-layout detection data: the data YAML, a validating Dataset, and its DataLoader.

Labels live next to images with ``images`` replaced by ``labels`` in the path and a
``.txt`` suffix; each line is ``class cx cy w h`` normalized to [0, 1]. Bad files and lines
are reported with file and line: ``strict`` (the default) raises, as bad input does everywhere;
``strict=False`` skips them with one warning, for a large set where a few bad labels may go.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from trainers.data.augment import apply_letterbox, letterbox
from trainers.data.augment import augment as random_augment
from trainers.utils import LOGGER, UserError, yaml_problem

IMG_SUFFIXES = {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}
REQUIRED_KEYS = ("train", "val", "names")
MAX_LISTED = 20  # problems spelled out in the warning; the rest are counted


# ----------------------------------------------------------------------------- data YAML
def load_data_yaml(path) -> dict:
    """Parse and check a data YAML; split paths come back absolute, ``names`` as ``{i: name}``.

    ``path`` in the YAML is relative to the YAML's folder (default: that folder); ``train``,
    ``val`` and ``test`` are relative to ``path``. The bare name ``shapes8.yaml`` (when no
    such file exists) is the built-in synthetic dataset, generated on first use.
    """
    file = Path(path)
    if not file.is_file() and str(path) == "shapes8.yaml":
        from trainers.data.shapes import ensure_shapes8
        file = ensure_shapes8()
    if not file.is_file():
        raise UserError(f"data YAML not found: {path}")
    data = _read_yaml(file)
    missing = [k for k in REQUIRED_KEYS if data.get(k) in (None, "", [])]
    if missing:
        raise UserError(f"data YAML {file} is missing key(s): {', '.join(missing)}")
    names = _check_names(data["names"], file)
    if data.get("nc") is not None and data["nc"] != len(names):
        raise UserError(f"data YAML {file}: nc={data['nc']} but names has {len(names)} entries")
    root = Path(data.get("path") or ".")
    root = (root if root.is_absolute() else file.parent / root).resolve()
    out = {**data, "path": str(root), "names": names, "nc": len(names), "yaml_file": str(file)}
    for split in ("train", "val", "test"):
        if data.get(split):
            out[split] = _resolve_split(data[split], root, split, file)
    return out


def _read_yaml(file: Path) -> dict:
    try:
        data = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"data YAML {file} is not valid YAML ({yaml_problem(e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"data YAML {file} must be a mapping with keys {', '.join(REQUIRED_KEYS)}")
    return data


def _check_names(names, file: Path) -> dict[int, str]:
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise UserError(f"data YAML {file}: 'names' must be a non-empty list or {{index: name}} mapping")
    if sorted(names) != list(range(len(names))):
        raise UserError(f"data YAML {file}: 'names' keys must be 0..{len(names) - 1}, got {sorted(names)}")
    return {int(k): str(v) for k, v in sorted(names.items())}


def _resolve_split(value, root: Path, split: str, file: Path):
    paths = value if isinstance(value, list) else [value]
    resolved = []
    for p in paths:
        full = Path(p) if Path(p).is_absolute() else root / p
        if not full.exists():
            raise UserError(f"data YAML {file}: '{split}' folder not found: {full}")
        resolved.append(str(full))
    return resolved if isinstance(value, list) else resolved[0]


# ----------------------------------------------------------------------------- dataset
def img2label_path(img_path) -> Path:
    """``.../images/x/a.png`` -> ``.../labels/x/a.txt`` (the last ``images`` part is replaced)."""
    parts = list(Path(img_path).parts)
    idx = max((i for i, p in enumerate(parts) if p == "images"), default=None)
    if idx is None:
        return Path(img_path).with_suffix(".txt")
    parts[idx] = "labels"
    return Path(*parts).with_suffix(".txt")


class YOLODataset(Dataset):
    """Images + YOLO labels, letterboxed to ``imgsz`` squares.

    ``labels`` holds one record per usable image: ``im_file``, ``shape`` ``(h, w)``, ``cls``
    ``(m,)`` and ``bboxes`` ``(m, 4)`` normalized xywh in the original image.
    ``nc`` (when given) bounds the class ids.
    """

    def __init__(self, img_dir, imgsz: int, augment: bool = False, strict: bool = True,
                 hyp=None, nc: int | None = None):
        self.imgsz, self.augment, self.hyp, self.nc = int(imgsz), augment, hyp, nc
        self.problems: list[str] = []
        self.skipped_images = self.skipped_lines = 0
        files = self._find_images(img_dir)
        self.labels = [rec for rec in map(self._load_record, files) if rec is not None]
        self._report(img_dir, strict)
        if not self.labels:
            raise UserError(f"no usable images found in {img_dir}")

    # ---- discovery and validation
    def _find_images(self, img_dir) -> list[Path]:
        sources = img_dir if isinstance(img_dir, (list, tuple)) else [img_dir]
        files: list[Path] = []
        for src in map(Path, sources):
            if src.is_dir():
                found = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMG_SUFFIXES)
                files += found
                self._orphan_labels(src, found)
            elif src.is_file() and src.suffix == ".txt":
                files += self._list_file(src)
            elif src.is_file() and src.suffix.lower() in IMG_SUFFIXES:
                files.append(src)
            else:
                raise UserError(f"image folder not found: {src}")
        return files

    def _list_file(self, src: Path) -> list[Path]:
        """An image list file: one path per line, relative to the list's folder."""
        files = []
        for n, line in enumerate(src.read_text().splitlines(), 1):
            if line.strip():
                p = Path(line.strip())
                p = p if p.is_absolute() else src.parent / p
                if p.is_file():
                    files.append(p)
                else:
                    self._problem(f"{src}:{n}: missing image {p}", image=True)
        return files

    def _orphan_labels(self, img_root: Path, images: list[Path]) -> None:
        """Label files whose image is missing: reported, nothing to load."""
        lbl_root = img2label_path(img_root / "x").parent
        if lbl_root == img_root or not lbl_root.is_dir():
            return
        have = {img2label_path(p) for p in images}
        for lbl in sorted(lbl_root.rglob("*.txt")):
            if lbl not in have:
                self._problem(f"{lbl}: missing image for this label file", image=True)

    def _load_record(self, im_file: Path):
        shape = self._image_shape(im_file)
        if shape is None:
            return None
        cls, boxes = self._parse_label(img2label_path(im_file))
        return {"im_file": str(im_file), "shape": shape, "cls": cls, "bboxes": boxes}

    def _image_shape(self, im_file: Path):
        """``(h, w)`` after EXIF rotation, or None (reported) when the file is unreadable."""
        try:
            with Image.open(im_file) as im:
                im.verify()  # must come right after open; checks the file's structure
            with Image.open(im_file) as im:
                w, h = im.size
                if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF says rotated 90 degrees
                    w, h = h, w
        except Exception as e:  # PIL raises many types for corrupt files
            self._problem(f"{im_file}: unreadable image ({type(e).__name__}: {e})", image=True)
            return None
        return h, w

    def _parse_label(self, lbl_file: Path):
        rows = []
        if lbl_file.is_file():
            for n, line in enumerate(lbl_file.read_text(errors="replace").splitlines(), 1):
                if line.strip():
                    row = self._parse_line(line, f"{lbl_file}:{n}")
                    if row is not None:
                        rows.append(row)
        arr = np.array(rows, dtype=np.float32).reshape(-1, 5)
        return arr[:, 0].copy(), arr[:, 1:].copy()

    def _parse_line(self, line: str, where: str):
        """``[cls, cx, cy, w, h]`` or None after reporting what is wrong with the line."""
        fields = line.split()
        if len(fields) != 5:
            return self._problem(f"{where}: expected 5 fields 'class cx cy w h', got {len(fields)}")
        try:
            values = [float(f) for f in fields]
        except ValueError:
            return self._problem(f"{where}: non-numeric value in {line.strip()!r}")
        cls = values[0]
        if not all(math.isfinite(v) for v in values) or cls != int(cls) or cls < 0:
            return self._problem(f"{where}: bad class id or value in {line.strip()!r}")
        if self.nc is not None and cls >= self.nc:
            return self._problem(f"{where}: class {int(cls)} out of range [0, {self.nc - 1}]")
        if not all(0.0 <= v <= 1.0 for v in values[1:]):
            return self._problem(f"{where}: coordinates outside [0, 1] in {line.strip()!r}")
        if values[3] <= 0 or values[4] <= 0:
            return self._problem(f"{where}: zero-size box in {line.strip()!r}")
        return values

    def _problem(self, message: str, image: bool = False):
        self.problems.append(message)
        if image:
            self.skipped_images += 1
        else:
            self.skipped_lines += 1
        return None

    def _report(self, img_dir, strict: bool) -> None:
        if not self.problems:
            return
        if strict:
            more = len(self.problems) - 1
            raise UserError(self.problems[0] + (f" (and {more} more problem(s))" if more else "")
                            + "; strict=False skips them with a warning")
        listed = "\n  ".join(self.problems[:MAX_LISTED])
        extra = len(self.problems) - MAX_LISTED
        LOGGER.warning(
            f"WARNING {img_dir}: skipped {self.skipped_images} image(s) and {self.skipped_lines} "
            f"label line(s):\n  {listed}" + (f"\n  ... and {extra} more" if extra > 0 else ""))

    # ---- items
    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        rec = self.labels[index]
        img = load_image(rec["im_file"])
        h0, w0 = img.shape[:2]
        boxes = _xywhn_to_xyxy(rec["bboxes"], w0, h0)
        img, gain, pad = letterbox(img, self.imgsz)
        boxes = apply_letterbox(boxes, gain, pad)
        cls = rec["cls"]
        if self.augment:
            rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,))))
            img, boxes, keep = random_augment(img, boxes, self.hyp, rng)
            cls = cls[keep]
        return {
            "img": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
            "cls": torch.from_numpy(cls.astype(np.float32)).view(-1, 1),
            "bboxes": torch.from_numpy(_xyxy_to_xywhn(boxes, self.imgsz).astype(np.float32)),
            "im_file": rec["im_file"],
            "ori_shape": (h0, w0),
            "ratio_pad": (gain, pad),
        }

    @staticmethod
    def collate_fn(items: list[dict]) -> dict:
        """Stack images; concatenate labels with ``batch_idx`` saying which image each is in."""
        counts = [len(it["cls"]) for it in items]
        return {
            "img": torch.stack([it["img"] for it in items]),
            "cls": torch.cat([it["cls"] for it in items]).view(-1, 1),
            "bboxes": torch.cat([it["bboxes"] for it in items]).view(-1, 4),
            "batch_idx": torch.cat([torch.full((n,), float(i)) for i, n in enumerate(counts)]),
            "im_file": [it["im_file"] for it in items],
            "ori_shape": [it["ori_shape"] for it in items],
            "ratio_pad": [it["ratio_pad"] for it in items],
        }


def load_image(path) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB with EXIF rotation applied."""
    try:
        with Image.open(path) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except Exception as e:
        raise UserError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def _xywhn_to_xyxy(b: np.ndarray, w: int, h: int) -> np.ndarray:
    out = np.empty_like(b, dtype=np.float64)
    out[:, 0], out[:, 2] = (b[:, 0] - b[:, 2] / 2) * w, (b[:, 0] + b[:, 2] / 2) * w
    out[:, 1], out[:, 3] = (b[:, 1] - b[:, 3] / 2) * h, (b[:, 1] + b[:, 3] / 2) * h
    return out


def _xyxy_to_xywhn(b: np.ndarray, size: int) -> np.ndarray:
    out = np.empty((len(b), 4), dtype=np.float64)
    out[:, 0], out[:, 1] = (b[:, 0] + b[:, 2]) / 2 / size, (b[:, 1] + b[:, 3]) / 2 / size
    out[:, 2], out[:, 3] = (b[:, 2] - b[:, 0]) / size, (b[:, 3] - b[:, 1]) / size
    return out


# ----------------------------------------------------------------------------- loader
class UnpaddedDistributedSampler(DistributedSampler):
    """In-order shards that cover every sample exactly once (no padding duplicates).

    For evaluation: padded duplicates would be counted twice in the metrics.
    """

    def __init__(self, dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def _seed_worker(worker_id: int) -> None:
    """Give numpy/random in each loader process a seed derived from torch's per-worker seed."""
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_yolo_loader(dataset, batch: int, shuffle: bool, workers: int = 0, rank: int = -1,
                      world_size: int = 1, seed: int = 0) -> DataLoader:
    """DataLoader for a YOLODataset; a DistributedSampler shards it when ``world_size > 1``.

    Training (``shuffle=True``) uses the standard padded sampler (call ``set_epoch`` each
    epoch); evaluation uses unpadded shards so each image is scored once.
    """
    sampler = None
    if world_size > 1:
        if shuffle:
            sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                         shuffle=True, seed=seed)
        else:
            sampler = UnpaddedDistributedSampler(dataset, world_size, rank)
    nw = max(0, min(int(workers), os.cpu_count() or 1))
    generator = torch.Generator()
    generator.manual_seed(int(seed) + max(rank, 0))
    return DataLoader(dataset, batch_size=batch, shuffle=shuffle and sampler is None,
                      sampler=sampler, num_workers=nw, collate_fn=YOLODataset.collate_fn,
                      pin_memory=torch.cuda.is_available(), worker_init_fn=_seed_worker,
                      generator=generator, persistent_workers=nw > 0)
