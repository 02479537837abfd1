"""What a run trained on, as MLflow's dataset lineage shows it (SPEC §8): a name, the source, a
digest of the file list and the labels, split sizes and class names.

Plain data (a dict), made on the driver before the run starts: it travels to the callback actor,
whose MLflow sink logs it with the run's params. The digest changes when a file is added, removed
or renamed, or a label changes; image bytes are not read (a large set would cost minutes).
"""
from __future__ import annotations

import hashlib
from pathlib import Path


def describe_dataset(data: str | None, task: str | None) -> dict | None:
    """The run's data set described, or None when the run names none."""
    if not data:
        return None
    if task == "detect":
        return _yolo(data)
    return _digits() if data == "digits" else _class_folders(Path(data))


def _yolo(data: str) -> dict:
    from trainers.data.yolo import img2label_path, load_data_yaml

    info = load_data_yaml(data)
    splits = {s: Path(info[s]) for s in ("train", "val", "test") if isinstance(info.get(s), str)}
    digest, sizes = _digest_files(splits, img2label_path)
    return _described(Path(info["path"]).name, info["yaml_file"], digest, sizes, info["names"])


def _class_folders(root: Path) -> dict:
    splits = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir()) if "train" in splits else []
    digest, sizes = _digest_files(splits, labels_of=None)  # the class is the folder: in each name
    return _described(root.name, str(root.resolve()), digest, sizes, dict(enumerate(classes)))


def _digits() -> dict:
    from trainers.data.classify import DIGITS_VAL_FRACTION, digits_file, read_digits, stratified_split

    path = digits_file()
    _, labels = read_digits()
    train, val = stratified_split(labels, DIGITS_VAL_FRACTION, seed=0)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return _described("digits", str(path), digest, {"train": len(train), "val": len(val)},
                      {i: str(i) for i in range(10)})


def _digest_files(splits: dict[str, Path], labels_of) -> tuple[str, dict[str, int]]:
    """A digest of each split's image names (and their label files' contents), and the split sizes."""
    from trainers.data.sources import IMAGE_SUFFIXES  # (imports torch: only when a folder is read)

    digest, sizes = hashlib.sha256(), {}
    for split, folder in splits.items():
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        sizes[split] = len(images)
        for image in images:
            digest.update(f"{split}/{image.relative_to(folder).as_posix()}\n".encode())
            label = labels_of(image) if labels_of else None
            if label is not None and label.is_file():
                digest.update(label.read_bytes())
    return digest.hexdigest(), sizes


def _described(name: str, source: str, digest: str, sizes: dict, names: dict) -> dict:
    return {"name": name, "source": source, "digest": digest[:32], "splits": sizes,
            "names": [names[i] for i in sorted(names)]}
