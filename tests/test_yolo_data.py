"""YOLO-layout data: the shapes generator, the data YAML, label validation, letterbox, loader."""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data.distributed import DistributedSampler

from trainers.data.augment import unletterbox_boxes
from trainers.data.shapes import NAMES, ensure_shapes8, generate_shapes, render_image
from trainers.data.yolo import YOLODataset, build_yolo_loader, load_data_yaml
from trainers.utils import UserError


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- generator
def test_shapes_generator_is_deterministic(tmp_path):
    a = generate_shapes(tmp_path / "a", n_train=6, n_val=3, seed=3)
    b = generate_shapes(tmp_path / "b", n_train=6, n_val=3, seed=3)
    c = generate_shapes(tmp_path / "c", n_train=6, n_val=3, seed=4)
    fa, fb, fc = _files(a.parent), _files(b.parent), _files(c.parent)
    assert len([k for k in fa if k.suffix == ".png"]) == 9
    assert fa == fb
    assert {k: v for k, v in fa.items() if k.suffix == ".png"} != {k: v for k, v in fc.items() if k.suffix == ".png"}


def test_shapes_labels_are_valid_and_the_yaml_loads(tmp_path):
    yaml_path = generate_shapes(tmp_path / "ds", n_train=10, n_val=4, imgsz=96, seed=0)
    assert yaml_path.read_text().startswith("# shapes8:")
    data = load_data_yaml(yaml_path)
    assert data["nc"] == 4 and data["names"] == dict(enumerate(NAMES))
    for split, n in (("train", 10), ("val", 4)):
        labels = sorted((tmp_path / "ds" / "labels" / split).glob("*.txt"))
        assert len(labels) == n
        for lbl in labels:
            assert Image.open(tmp_path / "ds" / "images" / split / f"{lbl.stem}.png").size == (96, 96)
            rows = [line.split() for line in lbl.read_text().splitlines()]
            assert 1 <= len(rows) <= 4
            for cls, *xywh in rows:
                assert 0 <= int(cls) < 4
                cx, cy, w, h = map(float, xywh)
                assert 14 / 96 - 0.02 <= max(w, h) and min(w, h) <= 0.6
                tol = 1e-6  # labels carry 6 decimals
                assert -tol <= cx - w / 2 and cx + w / 2 <= 1 + tol
                assert -tol <= cy - h / 2 and cy + h / 2 <= 1 + tol


def test_shapes_cross_is_rare_and_overlaps_happen():
    counts, overlaps = np.zeros(4), 0
    for i in range(250):
        _, labels = render_image(np.random.default_rng([0, 0, i]), 96)
        for lab in labels:
            counts[lab[0]] += 1
        boxes = [(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2) for _, cx, cy, w, h in labels]
        overlaps += any(min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])
                        for k, a in enumerate(boxes) for b in boxes[k + 1:])
    share = counts / counts.sum()
    assert 0.02 < share[3] < 0.09, share
    assert (share[:3] > 0.25).all(), share
    assert overlaps >= 10


def test_generate_refuses_to_overwrite_and_ensure_reuses(tmp_path):
    root = tmp_path / "shapes8"
    (root).mkdir()
    (root / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="overwrite=True"):
        generate_shapes(root, n_train=2, n_val=1)
    yaml_path = generate_shapes(root, n_train=2, n_val=1, overwrite=True)
    assert not (root / "keep.txt").exists()
    stamp = yaml_path.stat().st_mtime_ns
    assert ensure_shapes8(root) == yaml_path and yaml_path.stat().st_mtime_ns == stamp


def test_concurrent_first_use_yields_one_complete_dataset(tmp_path):
    root = tmp_path / "shapes8"
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:
        paths = list(pool.map(_ensure_small, [root, root, root]))
    assert paths == [root / "data.yaml"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes8"]  # no temp folders left
    assert len(list((root / "images" / "train").glob("*.png"))) == 4
    assert _files(root) == _files(generate_shapes(tmp_path / "ref", n_train=4, n_val=2).parent)


def _ensure_small(root):
    return ensure_shapes8(root, n_train=4, n_val=2)


# ----------------------------------------------------------------------------- data YAML
def _layout(root, splits=("train", "val")):
    for s in splits:
        (root / "images" / s).mkdir(parents=True, exist_ok=True)
        (root / "labels" / s).mkdir(parents=True, exist_ok=True)


def test_data_yaml_resolves_paths(tmp_path):
    _layout(tmp_path / "d")
    f = tmp_path / "d" / "data.yaml"
    f.write_text("train: images/train\nval: [images/val]\nnames: [a, b]\n")
    data = load_data_yaml(f)
    assert data["train"] == str((tmp_path / "d" / "images" / "train").resolve())
    assert data["val"] == [str((tmp_path / "d" / "images" / "val").resolve())]
    assert data["nc"] == 2 and data["names"] == {0: "a", 1: "b"}


@pytest.mark.parametrize("text, message", [
    ("train: images/train\nval: images/val\n", "missing key(s): names"),
    ("names: [a]\n", "missing key(s): train, val"),
    ("train: images/train\nval: images/nope\nnames: [a]\n", "'val' folder not found"),
    ("train: images/train\nval: images/val\nnames: {0: a, 2: b}\n", "'names' keys must be 0..1"),
    ("train: images/train\nval: images/val\nnames: [a, b]\nnc: 3\n", "nc=3 but names has 2"),
    ("names: [a]\ntrain: [unclosed\n", "is not valid YAML (line 3, column 1: expected ',' or ']'"),
])
def test_data_yaml_errors_name_the_problem(tmp_path, text, message):
    _layout(tmp_path)
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(UserError) as e:
        load_data_yaml(f)
    assert message in str(e.value) and str(f) in str(e.value)


def test_data_yaml_missing_file(tmp_path):
    with pytest.raises(UserError, match="data YAML not found: .*nope.yaml"):
        load_data_yaml(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------- validation
def _bad_dataset(root):
    _layout(root, ("val",))
    img = np.zeros((40, 50, 3), np.uint8)
    for name in ("good", "other"):
        Image.fromarray(img).save(root / "images" / "val" / f"{name}.png")
    (root / "labels" / "val" / "good.txt").write_text(
        "0 0.5 0.5 0.2 0.2\n"       # line 1: fine
        "1 0.5 0.5 0.2\n"           # line 2: 4 fields
        "1 0.5 abc 0.2 0.2\n"       # line 3: not a number
        "7 0.5 0.5 0.2 0.2\n"       # line 4: class out of range
        "\n"                        # line 5: blank, ignored
        "1 0.5 1.4 0.2 0.2\n")      # line 6: outside [0, 1]
    (root / "labels" / "val" / "other.txt").write_text("1 0.25 0.25 0.1 0.1\n")
    (root / "images" / "val" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (root / "labels" / "val" / "ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    return root / "images" / "val"


def test_strict_raises_with_file_and_line(tmp_path):
    img_dir = _bad_dataset(tmp_path)
    with pytest.raises(UserError) as e:
        YOLODataset(img_dir, 64, nc=2)  # the default
    msg = str(e.value)
    assert "\n" not in msg
    ghost = tmp_path / "labels" / "val" / "ghost.txt"
    assert msg == (f"{ghost}: missing image for this label file (and 5 more problem(s)); strict=False skips them "
                   f"with a warning")


def test_not_strict_skips_and_warns_once(tmp_path, warnings_seen):
    img_dir = _bad_dataset(tmp_path)
    ds = YOLODataset(img_dir, 64, nc=2, strict=False)
    assert len(warnings_seen) == 1
    text = warnings_seen[0].getMessage()
    good = tmp_path / "labels" / "val" / "good.txt"
    for where in (f"{good}:2: expected 5 fields", f"{good}:3: non-numeric", f"{good}:4: class 7 out of range",
                  f"{good}:6: coordinates outside [0, 1]", "corrupt.png: unreadable image",
                  "ghost.txt: missing image"):
        assert where in text, where
    assert f"{good}:1" not in text and f"{good}:5" not in text
    files = {r["im_file"].rsplit("/", 1)[-1]: r for r in ds.labels}
    assert sorted(files) == ["good.png", "other.png"]
    np.testing.assert_allclose(files["good.png"]["bboxes"], [[0.5, 0.5, 0.2, 0.2]])
    assert len(ds[0]["cls"]) == 1


def test_image_list_file_reports_missing_image(tmp_path, warnings_seen):
    img_dir = _bad_dataset(tmp_path)
    lst = tmp_path / "val.txt"
    lst.write_text("images/val/good.png\nimages/val/absent.png\n")
    ds = YOLODataset(lst, 64, nc=2, strict=False)
    assert len(ds) == 1 and len(warnings_seen) == 1
    assert f"{lst}:2: missing image" in warnings_seen[0].getMessage()
    with pytest.raises(UserError, match="image folder not found"):
        YOLODataset(img_dir / "nowhere", 64)


# ----------------------------------------------------------------------------- geometry
def _one_box_image(root, size_hw, box_xyxy, colour=(255, 255, 255)):
    _layout(root, ("val",))
    h, w = size_hw
    img = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = box_xyxy
    img[y1:y2, x1:x2] = colour
    Image.fromarray(img).save(root / "images" / "val" / "a.png")
    cx, cy, bw, bh = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h
    (root / "labels" / "val" / "a.txt").write_text(f"0 {cx} {cy} {bw} {bh}\n")
    return root / "images" / "val"


def _bright_extent(img_chw: torch.Tensor, thr: int) -> np.ndarray:
    mask = img_chw.numpy().min(0) > thr
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)


def _label_xyxy(item, imgsz) -> np.ndarray:
    cx, cy, w, h = (item["bboxes"][0] * imgsz).tolist()
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def test_letterbox_keeps_boxes_aligned(tmp_path):
    img_dir = _one_box_image(tmp_path, (120, 200), (40, 30, 100, 90))
    item = YOLODataset(img_dir, 100)[0]
    assert item["img"].shape == (3, 100, 100) and item["img"].dtype == torch.uint8
    (gx, gy), (px, py) = item["ratio_pad"]
    assert (gx, gy, px, py) == (0.5, 0.5, 0.0, 20.0) and item["ori_shape"] == (120, 200)
    expected = np.array([20, 35, 50, 65], dtype=float)  # scaled by 0.5, shifted down by the 20 px pad
    np.testing.assert_allclose(_label_xyxy(item, 100), expected, atol=1e-4)
    np.testing.assert_allclose(_bright_extent(item["img"], 127), expected, atol=1)
    # the pad is grey, and mapping back recovers the original pixels
    assert (item["img"][:, :20] == 114).all() and (item["img"][:, 80:] == 114).all()
    back = unletterbox_boxes(torch.from_numpy(expected[None]), item["ratio_pad"], item["ori_shape"])
    np.testing.assert_allclose(back.numpy()[0], [40, 30, 100, 90], atol=1e-6)


def test_augmentation_moves_boxes_with_pixels(tmp_path):
    img_dir = _one_box_image(tmp_path, (64, 64), (20, 12, 40, 44))
    hyp = {"hsv_v": 0.2, "scale": 0.3, "translate": 0.1, "fliplr": 0.5}
    ds = YOLODataset(img_dir, 64, augment=True, hyp=hyp)
    torch.manual_seed(0)
    flips = set()
    for _ in range(12):
        item = ds[0]
        assert len(item["cls"]) == 1
        label = _label_xyxy(item, 64)
        np.testing.assert_allclose(_bright_extent(item["img"], 170), label, atol=1.6)
        flips.add(label[0] > 64 - label[2])
    assert flips == {True, False}  # the flip happened sometimes, not always


# ----------------------------------------------------------------------------- batches
def test_collate_and_distributed_loader(tmp_path):
    yaml_path = generate_shapes(tmp_path / "ds", n_train=5, n_val=5, imgsz=64, seed=1)
    data = load_data_yaml(yaml_path)
    ds = YOLODataset(data["val"], 64, nc=data["nc"])
    batch = next(iter(build_yolo_loader(ds, batch=3, shuffle=False, workers=0)))
    n = sum(len(ds.labels[i]["cls"]) for i in range(3))
    assert batch["img"].shape == (3, 3, 64, 64) and batch["img"].dtype == torch.uint8
    assert batch["cls"].shape == (n, 1) and batch["bboxes"].shape == (n, 4) and batch["batch_idx"].shape == (n,)
    assert batch["batch_idx"].tolist() == sorted(batch["batch_idx"].tolist())
    assert set(batch["batch_idx"].tolist()) <= {0.0, 1.0, 2.0}
    assert len(batch["im_file"]) == len(batch["ori_shape"]) == len(batch["ratio_pad"]) == 3
    assert ((batch["bboxes"] >= 0) & (batch["bboxes"] <= 1)).all()

    seen = []
    for rank in range(2):
        loader = build_yolo_loader(ds, batch=2, shuffle=False, workers=0, rank=rank, world_size=2)
        assert isinstance(loader.sampler, DistributedSampler)
        seen += [f for b in loader for f in b["im_file"]]
    assert sorted(seen) == sorted(r["im_file"] for r in ds.labels)  # each image exactly once

    train = build_yolo_loader(ds, batch=2, shuffle=True, workers=0, rank=1, world_size=2, seed=0)
    assert isinstance(train.sampler, DistributedSampler)
    train.sampler.set_epoch(0)
    first = list(train.sampler)
    train.sampler.set_epoch(1)
    assert len(first) == 3 and (list(train.sampler) != first or len(ds) < 3)
