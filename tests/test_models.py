"""Model specs, layer naming, freezing, eval outputs, tracing, weight transfer, learning."""
from __future__ import annotations

import copy
import logging
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import own_lines
from trainers.models import (ClassificationModel, DetectionModel, load_spec, parse_model,
                             resolve_spec, spec_task)
from trainers.models.build import SPECS_DIR, builtin_specs
from trainers.models.modules import Conv
from trainers.utils import LOGGER, UserError

def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def det():
    torch.manual_seed(0)
    return DetectionModel("det-n.yaml", nc=3, verbose=False)


# ---------------------------------------------------------------- specs and parsing

@pytest.mark.parametrize("family", ["det", "cls"])
def test_s_scale_is_bigger_than_n(family):
    sizes = {}
    for scale in ("n", "s"):
        spec = load_spec(f"{family}-{scale}.yaml")
        assert spec["scale"] == scale
        layers, save = parse_model(spec, ch=3, nc=5, verbose=False)
        sizes[scale] = n_params(layers)
        assert all(0 <= i < len(layers) for i in save)
    assert sizes["s"] > 2 * sizes["n"]


def test_builtin_names_resolve_and_tasks():
    assert set(builtin_specs()) >= {"cls-n.yaml", "cls-s.yaml", "det-n.yaml", "det-s.yaml"}
    assert resolve_spec("det-s.yaml") == SPECS_DIR / "det.yaml"
    assert resolve_spec("cls-n.yaml") == SPECS_DIR / "cls.yaml"
    assert spec_task(load_spec("det-n.yaml")) == "detect"
    assert spec_task(load_spec("cls-s.yaml")) == "classify"


def test_detector_n_is_tiny(det):
    assert 100_000 < n_params(det) < 400_000


def test_user_spec_path_with_scale_suffix(tmp_path):
    text = (SPECS_DIR / "det.yaml").read_text()
    (tmp_path / "mine.yaml").write_text(text)
    spec = load_spec(tmp_path / "mine-s.yaml")
    assert spec["scale"] == "s"
    assert resolve_spec(tmp_path / "mine.yaml") == tmp_path / "mine.yaml"


def test_missing_spec_names_it():
    with pytest.raises(UserError, match="det-x9.yaml.*built-in specs: .*det-n.yaml"):
        resolve_spec("det-x9.yaml")


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("nc: 2\nbackbone:\n  - [-1, 1, Conv, [16, 3, 2]\nhead: [\n")
    with pytest.raises(UserError, match=r"bad\.yaml: malformed YAML \(line \d+, column \d+: "):
        load_spec(bad)


@pytest.mark.parametrize("name, head, model_cls, message", [
    ("odd.yaml", "  - [-1, 1, Warp, [3]]\n", "DetectionModel", r"odd\.yaml: head\[0\]: unknown module 'Warp'"),
    ("loop.yaml", "  - [[-1, 5], 1, Concat, [1]]\n  - [-1, 1, Classify, [nc]]\n", "ClassificationModel",
     r"loop\.yaml: head\[0\].*'from' index 5"),
])
def test_bad_spec_row_is_named(tmp_path, name, head, model_cls, message):
    """An unknown module, a 'from' index past the layers: the error names the file and the row."""
    bad = tmp_path / name
    bad.write_text("nc: 2\nbackbone:\n  - [-1, 1, Conv, [16, 3, 2]]\nhead:\n" + head)
    with pytest.raises(UserError, match=message):
        {"DetectionModel": DetectionModel, "ClassificationModel": ClassificationModel}[model_cls](bad, verbose=False)


# ---------------------------------------------------------------- naming and freezing

def test_parameter_names_and_conv_parts(det):
    names = [n for n, _ in det.named_parameters()]
    assert names[0] == "model.0.conv.weight"
    assert "model.0.bn.weight" in names and "model.0.bn.bias" in names
    assert all(n.startswith("model.") for n in names)
    conv = det.model[0]
    assert isinstance(conv, Conv)
    assert [n for n, _ in conv.named_children()] == ["conv", "bn", "act"]


def test_freeze_prefixes_cover_backbone_and_really_freeze():
    torch.manual_seed(0)
    model = DetectionModel("det-n.yaml", nc=2, verbose=False)
    n_backbone = len(model.yaml["backbone"])
    assert n_backbone >= 10
    prefixes = tuple(f"model.{i}." for i in range(10))
    frozen = {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
    backbone = {f"model.{i}.{n}" for i in range(n_backbone)
                for n, _ in model.model[i].named_parameters()}
    assert frozen == backbone and len(frozen) > 0
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss, _ = model.loss(_det_batch(2))
    loss.backward()
    opt.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert any(not torch.equal(before[n], after[n]) for n in before if n not in frozen)


# ---------------------------------------------------------------- outputs

def _det_batch(bs: int = 2, size: int = 64) -> dict:
    return {"img": torch.rand(bs, 3, size, size),
            "cls": torch.tensor([[0.0], [1.0], [1.0]]),
            "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.25, 0.3, 0.2, 0.2],
                                    [0.7, 0.6, 0.3, 0.5]]),
            "batch_idx": torch.tensor([0.0, 0.0, 1.0])[: 3 if bs > 1 else 2]}


def test_detection_train_and_eval_outputs(det):
    x = torch.rand(2, 3, 96, 128)
    det.train()
    raw = det(x)
    assert [tuple(r.shape) for r in raw] == [(2, 3 + 4 * 8, 96 // s, 128 // s) for s in (8, 16, 32)]
    det.eval()
    decoded, raw_eval = det(x)
    n_anchors = sum((96 // s) * (128 // s) for s in (8, 16, 32))
    assert decoded.shape == (2, 4 + 3, n_anchors)
    assert len(raw_eval) == 3
    probs = decoded[:, 4:]
    assert probs.min() >= 0 and probs.max() <= 1
    assert det.stride.tolist() == [8.0, 16.0, 32.0]


def test_decode_places_boxes_in_pixels():
    """With a forced distance of 2 bins per side, every box is 4 strides wide at its cell."""
    model = DetectionModel("det-n.yaml", nc=1, verbose=False).eval()
    head = model.model[-1]
    with torch.no_grad():
        for branch in head.cv2:
            branch[-1].weight.zero_()
            branch[-1].bias.fill_(-20.0)
            branch[-1].bias.view(4, head.reg_max)[:, 2] = 20.0
        decoded, _ = model(torch.rand(1, 3, 64, 64))
    first = decoded[0, :4, :64].t()  # stride 8: 8x8 cells, row-major
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    expect = torch.stack(((xs.flatten() + 0.5) * 8, (ys.flatten() + 0.5) * 8,
                          torch.full((64,), 32.0), torch.full((64,), 32.0)), 1)
    assert torch.allclose(first, expect, atol=1e-3)
    last = decoded[0, 2:4, -1]
    assert torch.allclose(last, torch.tensor([128.0, 128.0]), atol=1e-3)  # 4 * stride 32


def test_trace_matches_eager_for_export(det):
    det.eval()
    det.export = True
    try:
        x = torch.rand(1, 3, 64, 64)
        traced = torch.jit.trace(det, x, check_trace=False)
        eager = det(x)
        assert torch.is_tensor(eager)
        assert torch.allclose(traced(x), eager, atol=1e-5)
    finally:
        det.export = False
    assert isinstance(det(torch.rand(1, 3, 64, 64)), tuple)


def test_classification_outputs_and_trace():
    model = ClassificationModel("cls-n.yaml", ch=1, nc=4, verbose=False).eval()
    x = torch.rand(3, 1, 32, 32)
    logits = model(x)
    assert logits.shape == (3, 4)
    assert torch.allclose(torch.jit.trace(model, x)(x), logits, atol=1e-5)
    assert model.yaml["ch"] == 1
    rebuilt = ClassificationModel(model.yaml, verbose=False)  # the saved spec knows ch=1
    rebuilt.load(model.state_dict(), verbose=False)
    assert torch.allclose(rebuilt.eval()(x), logits, atol=1e-6)


@pytest.mark.parametrize("size", [8, 64, 100])
def test_classifier_takes_rgb_images_of_any_size(size):
    model = ClassificationModel("cls-n.yaml", ch=3, nc=5, verbose=False).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, size, size)).shape == (2, 5)


def test_pickle_and_deepcopy_keep_outputs(det):
    det.eval()
    det.loss(_det_batch())  # builds the criterion; copies must still work
    x = torch.rand(1, 3, 64, 64)
    ref = det(x)[0]
    for clone in (copy.deepcopy(det), pickle.loads(pickle.dumps(det))):
        assert torch.allclose(clone.eval()(x)[0], ref)
        assert clone.names == det.names and clone.nc == det.nc
        loss, items = clone.loss(_det_batch())
        assert items.shape == (3,)


# ---------------------------------------------------------------- weight transfer

def test_load_transfers_matching_shapes_from_other_nc(tmp_path, caplog):
    torch.manual_seed(1)
    src = DetectionModel("det-n.yaml", nc=5, verbose=False)
    torch.manual_seed(2)
    dst = DetectionModel("det-n.yaml", nc=2, verbose=False)
    cls_name = "model.22.cv3.0.2.weight"  # last class conv: shape depends on nc
    dst_cls_before = dst.state_dict()[cls_name].clone()
    ckpt = tmp_path / "w.pt"
    torch.save({"epoch": 3, "model": src.state_dict()}, ckpt)
    LOGGER.propagate = True
    try:
        with caplog.at_level(logging.INFO, logger=LOGGER.name):
            dst.load(str(ckpt))
    finally:
        LOGGER.propagate = False
    n_total = len(dst.state_dict())
    assert any(f"/{n_total} items" in r.getMessage() for r in caplog.records)
    s, d = src.state_dict(), dst.state_dict()
    assert torch.equal(s["model.0.conv.weight"], d["model.0.conv.weight"])
    assert torch.equal(s["model.9.cv2.bn.running_mean"], d["model.9.cv2.bn.running_mean"])
    assert torch.equal(d[cls_name], dst_cls_before)
    assert s[cls_name].shape != d[cls_name].shape


def test_load_rejects_missing_file(det):
    with pytest.raises(UserError, match="nope.pt"):
        det.load("nope.pt")


# ---------------------------------------------------------------- checkpoint files that are not this project's

def _checkpoint(folder, **change):
    """A checkpoint as a run writes one (model, training state, args), with entries changed: a value,
    a function of the saved one, or None to drop the entry."""
    from trainers.config import get_cfg
    from trainers.engine import checkpoint as ckpt_io

    torch.manual_seed(0)
    model = ClassificationModel("cls-n.yaml", nc=3, verbose=False)
    args = get_cfg(None, {"task": "classify", "model": "cls-n.yaml", "data": "digits",
                          "project": str(folder / "runs"), "name": "train"}).to_dict()
    ckpt = {**ckpt_io.model_entry(model), **ckpt_io.stamp(), "ema": ckpt_io.float_state(model), "updates": 0,
            "optimizer": {}, "scaler": {}, "scheduler": {}, "epoch": 0, "step": 0, "best_fitness": 0.0,
            "fitness": 0.0, "train_args": args, "train_metrics": {}, "stopper": {}, "rng": [], "callbacks": {},
            "position": None}
    for key, value in change.items():
        if value is None:
            ckpt.pop(key)
        else:
            ckpt[key] = value(ckpt[key]) if callable(value) else value
    return ckpt


def _bad_file(folder, kind: str):
    path = folder / f"{kind}.pt"
    good = folder / "good.pt"
    torch.save(_checkpoint(folder), good)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("these are not weights\n")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    else:
        torch.save({
            "state_dict": {"a": torch.zeros(2)}, "list": [1, 2, 3],
            "no_model": _checkpoint(folder, model=None),
            "foreign_class": _checkpoint(folder, model_class="os.path.join"),
            "bad_args": _checkpoint(folder, train_args={"epochs": "abc"}),
            "edited_nc": _checkpoint(folder, nc=6),
        }[kind], path)
    return path


BAD_FILES = [
    ("state_dict", "is not a checkpoint of this project (no 'model_class', 'model_yaml', 'nc', 'model', "
                   "'train_args' entries)"),
    ("list", "is not a checkpoint of this project (it holds a list, not a dict of entries)"),
    ("empty", "is not a checkpoint of this project (the file is empty)"),
    ("text", "is not a checkpoint of this project (not a torch file)"),
    ("truncated", "is not a checkpoint of this project (a truncated or damaged torch file)"),
    ("no_model", "is not a checkpoint of this project (no 'model' entry)"),
    ("foreign_class", "is not a checkpoint of this project (its model_class 'os.path.join' is not a subclass of "
                      "trainers.models.tasks.BaseModel)"),
    ("bad_args", ": config key 'epochs': value 'abc' is not valid (expected int)"),
    ("edited_nc", "is not a checkpoint of this project (its weights do not fit its model spec: "
                  "model.9.linear.weight is [3, 256], the spec builds [6, 256])"),
]


@pytest.mark.parametrize("mode", ["train", "val", "predict", "export", "resume"])
@pytest.mark.parametrize("kind, message", BAD_FILES, ids=[kind for kind, _ in BAD_FILES])
def test_a_file_that_is_not_a_checkpoint_gets_one_line_naming_it(tmp_path, capsys, kind, message, mode):
    from orchestrator.cli import main

    path = _bad_file(tmp_path, kind)
    argv = ["train", f"resume={path}"] if mode == "resume" else [mode, f"model={path}"]
    assert main([*argv, f"project={tmp_path / 'runs'}", f"journal={tmp_path / 'journal'}"]) == 2
    (err,) = own_lines(capsys.readouterr().err)  # Ray's forwarded lines (an earlier test's) left out
    assert err.startswith("error: ") and str(path) in err and message in err, err


def test_a_checkpoint_loads_and_resume_needs_its_training_state(tmp_path):
    from orchestrator import Model
    from trainers.config import get_cfg
    from trainers.engine.resume import resolve_resume

    good, stateless = tmp_path / "good.pt", tmp_path / "stateless.pt"
    torch.save(_checkpoint(tmp_path), good)
    torch.save(_checkpoint(tmp_path, optimizer=None), stateless)
    assert Model(str(good)).task == "classify" and Model(str(stateless)).model.nc == 3
    with pytest.raises(UserError, match=f"^{stateless} is not a checkpoint of this project \\(no 'optimizer' entry\\)$"):
        resolve_resume(get_cfg(None, {"resume": str(stateless)}))


def test_resume_leaves_out_keys_its_checkpoint_has_and_this_version_does_not_with_one_warning(
        tmp_path, warnings_seen):
    """The user never typed the key: val of the file works, so a resume of it does too, and says so."""
    from orchestrator import Model
    from trainers.config import get_cfg
    from trainers.engine.resume import resolve_resume

    path = tmp_path / "newer.pt"
    torch.save(_checkpoint(tmp_path, train_args=lambda args: {**args, "bogus_key": 1}), path)
    args, ckpt = resolve_resume(get_cfg(None, {"resume": str(path), "epochs": 5}), given={"epochs"})
    assert args.epochs == 5 and args.name == "train" and not hasattr(args, "bogus_key")
    assert Model(str(path)).task == "classify"
    assert ckpt["train_args"]["bogus_key"] == 1  # what was saved is all there
    assert [r.getMessage() for r in warnings_seen] == [
        f"checkpoint {path}: ignoring config keys this version does not know: 'bogus_key'"]


# ---------------------------------------------------------------- learning

def test_classifier_learns_digits():
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
    train, test = perm[:1400], perm[1400:]
    model = ClassificationModel("cls-n.yaml", ch=1, nc=10, verbose=False)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    epochs, batches = 2, train.split(32)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, pct_start=0.2,
                                                total_steps=epochs * len(batches))
    model.train()
    for _ in range(epochs):
        for idx in train[torch.randperm(len(train))].split(32):
            loss, items = model.loss({"img": x[idx], "cls": y[idx]})
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    assert items.shape == (1,) and not items.requires_grad
    model.eval()
    with torch.no_grad():
        acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    assert acc > 0.9, acc


def test_model_classes_take_nc_second_as_the_spec_says():
    model = DetectionModel("det-n.yaml", 2, False)  # SPEC §5: DetectionModel(cfg, nc, verbose)
    assert model.nc == 2 and model.model[-1].nc == 2
    assert ClassificationModel("cls-n.yaml", 5, False).nc == 5


def test_a_checkpoint_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A process killed while it saves (here: last.pt's new bytes written, not yet on disk) leaves
    the previous file."""
    import os
    from types import SimpleNamespace

    from trainers.engine.trainer import BaseTrainer

    last = tmp_path / "last.pt"
    last.write_bytes(b"the epoch before")
    trainer = SimpleNamespace(checkpoint=lambda: {"epoch": 1}, wdir=tmp_path, last=last, best=tmp_path / "best.pt",
                              fitness=None, best_fitness=None, save_period=0, epoch=1)

    def killed(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        BaseTrainer.save_model(trainer)
    monkeypatch.undo()
    assert last.read_bytes() == b"the epoch before"
