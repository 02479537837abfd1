"""The seven customizations of SPEC §7 (examples/): each one's effect, not just that it runs."""
import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from examples import (custom_best_map50, custom_class_weights, custom_f1, custom_grad_clip, custom_layer_lr,
                      custom_sync_bn, custom_unfreeze)
from trainers.data.shapes import generate_shapes
from trainers.detect import DetectionLoss
from trainers.engine import checkpoint as ckpt_io
from trainers.utils import unwrap_model
from tests.servers import mlflow_store


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    data = generate_shapes(root / "tiny", n_train=32, n_val=16, imgsz=64)
    run = dict(data=str(data), imgsz=64, batch=8, nbs=8, workers=0, verbose=False, plots=False,
               project=str(root / "runs"), tracking_uri=mlflow_store(root / "mlflow.db"), storage=str(root / "store"))
    return {"root": root, "data": data, "run": run}


def rows_of(model) -> list[dict]:
    with open(model.trainer.history.path) as f:
        return list(csv.DictReader(f))


def built_trainer(cls, work, **overrides):
    """A trainer with its data and model built, as the loop has them before DDP would wrap the model."""
    trainer = cls(overrides={**work["run"], **overrides})
    trainer.data = trainer.get_dataset()
    trainer.model = trainer.get_model(verbose=False).to(trainer.device)
    return trainer


# 1 ------------------------------------------------------------------------------------------
def test_f1_per_class_in_every_epoch_row(work):
    model = custom_f1.main(**work["run"], epochs=2, name="f1")
    rows = rows_of(model)
    names = model.trainer.validator.metrics.names
    evaluated = [names[int(c)] for c in model.trainer.validator.metrics.box.ap_class_index]
    assert len(rows) == 2 and evaluated
    for row in rows:
        for name in evaluated:
            assert 0.0 <= float(row[f"f1/{name}"]) <= 1.0, row


# 2 ------------------------------------------------------------------------------------------
def test_class_weights_reach_the_bce_and_change_only_the_class_loss(work):
    trainer = built_trainer(custom_class_weights.WeightedTrainer, work)
    trainer.set_model_attributes()
    model = trainer.model
    labels = np.concatenate([r["cls"] for r in trainer.data["train"].labels]).astype(int)
    counts = np.bincount(labels, minlength=4)
    weights = model.class_weights
    assert weights.shape == (4,) and not torch.allclose(weights, torch.ones(4))
    assert int(weights.argmax()) == int(np.where(counts > 0, counts, counts.max() + 1).argmin())  # rarest
    weighted = model.init_criterion()
    assert torch.equal(weighted.bce.pos_weight, weights)

    loader = trainer.get_dataloader(trainer.data["train"], 8, -1, "train")
    batch = trainer.preprocess_batch(next(iter(loader)))
    model.train()
    preds = model(batch["img"])
    _, items_w = weighted(preds, batch)
    _, items_u = DetectionLoss(model)(preds, batch)
    assert items_w[1] != items_u[1]  # cls_loss differs
    assert torch.allclose(items_w[[0, 2]], items_u[[0, 2]])  # box and dfl do not


def test_class_weights_are_saved_with_the_model(work):
    model = custom_class_weights.main(**work["run"], epochs=1, name="weights")
    loaded = model.model  # rebuilt from best.pt by its import path
    assert type(loaded).__module__ == "examples.custom_class_weights"
    assert torch.equal(loaded.class_weights, unwrap_model(model.trainer.model).class_weights.cpu())


# 3 ------------------------------------------------------------------------------------------
def test_best_checkpoint_is_the_epoch_with_highest_map50(work):
    model = custom_best_map50.main(**work["run"], epochs=4, optimizer="AdamW", lr0=0.003, warmup_epochs=0,
                                   name="map50")
    rows = rows_of(model)
    map50 = [float(r["metrics/mAP50(B)"]) for r in rows]
    assert [float(r["fitness"]) for r in rows] == map50
    best = ckpt_io.load_checkpoint(model.trainer.best)
    assert map50[best["epoch"]] == max(map50), (best["epoch"], map50)
    assert best["best_fitness"] == pytest.approx(max(map50))


# 4 ------------------------------------------------------------------------------------------
def test_frozen_layers_train_only_after_unfreezing(work):
    seen = {}

    def snapshot(trainer):
        m = unwrap_model(trainer.model)
        seen[trainer.epoch] = {"backbone": m.model[0].conv.weight.detach().clone(),
                               "bn": m.model[0].bn.running_mean.detach().clone(),
                               "head": m.model[22].cv3[0][2].weight.detach().clone(),
                               "frozen": list(trainer.freeze_layer_names)}

    class Recording(custom_unfreeze.UnfreezeTrainer):
        unfreeze_after = 2

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.add_callback("on_train_start", lambda t: seen.setdefault("start", {
                "backbone": unwrap_model(t.model).model[0].conv.weight.detach().clone(),
                "bn": unwrap_model(t.model).model[0].bn.running_mean.detach().clone()}))
            self.add_callback("on_train_epoch_end", snapshot)

    model = custom_unfreeze.main(**work["run"], epochs=3, freeze=10, optimizer="AdamW", lr0=0.003,
                                 trainer=Recording, name="unfreeze")
    start = seen["start"]
    for epoch in (0, 1):
        assert torch.equal(seen[epoch]["backbone"], start["backbone"]), epoch
        assert torch.equal(seen[epoch]["bn"], start["bn"]), epoch  # frozen BN keeps its statistics
        assert len(seen[epoch]["frozen"]) == 10
    assert not torch.equal(seen[1]["head"], seen[0]["head"])
    assert not torch.equal(seen[2]["backbone"], seen[1]["backbone"])
    assert not torch.equal(seen[2]["bn"], seen[1]["bn"])
    assert seen[2]["frozen"] == [] and model.trainer.freeze_layer_names == []


# 5 ------------------------------------------------------------------------------------------
def test_per_layer_lrs_keep_their_ratio_through_warmup_and_schedule(work):
    steps = []

    def record(trainer):
        steps.append({g["name"]: g["lr"] for g in trainer.optimizer.param_groups})

    class Recording(custom_layer_lr.LayerLRTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.add_callback("optimizer_step", record)

    custom_layer_lr.main(**work["run"], epochs=3, warmup_epochs=1, lr0=0.002, trainer=Recording, name="lr")
    assert len(steps) == 12 and len(steps[0]) == 6
    heads = [s["head.weights"] for s in steps]
    assert len(set(heads)) >= 6  # warmup ramp and per-epoch decay both changed the lr
    assert heads[3] > heads[0] and heads[-1] < heads[4]
    for s in steps:
        for part in ("weights", "norms", "biases"):
            assert s[f"head.{part}"] == pytest.approx(s["head.weights"], rel=1e-12)
            assert s[f"backbone.{part}"] == pytest.approx(0.1 * s["head.weights"], rel=1e-9), s


# 6 ------------------------------------------------------------------------------------------
def count_sync_bn(model) -> tuple[int, int]:
    return (sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()),
            sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()))


def test_sync_batchnorm_only_with_several_workers(work):
    single = built_trainer(custom_sync_bn.SyncBNTrainer, work)
    single.set_model_attributes()
    assert count_sync_bn(single.model)[0] == 0 and single.model.nc == 4

    several = built_trainer(custom_sync_bn.SyncBNTrainer, work)
    several.world_size = 2
    bn_before = {k: v.clone() for k, v in several.model.state_dict().items()}
    if several.device.type == "cpu":
        several.set_model_attributes()  # torch syncs BN on GPUs only: CPU workers keep BatchNorm
        assert count_sync_bn(several.model)[0] == 0
        several.device = torch.device("cuda")  # the decision only; conversion itself moves nothing
    several.set_model_attributes()
    n_sync, n_bn = count_sync_bn(several.model)
    assert n_sync > 0 and n_bn == 0
    after = several.model.state_dict()
    assert all(torch.equal(bn_before[k], after[k]) for k in bn_before)  # same weights and statistics


# 7 ------------------------------------------------------------------------------------------
def test_gradient_norm_after_clipping_is_at_most_max_norm(work):
    seen = []

    def measure(trainer):
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        seen.append((float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))),
                     trainer.grad_norm))

    class Recording(custom_grad_clip.ClipTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.add_callback("optimizer_step", measure)

    model = custom_grad_clip.main(**work["run"], epochs=2, trainer=Recording, name="clip")
    max_norm = custom_grad_clip.ClipTrainer.max_norm
    assert len(seen) == 8
    assert all(after <= max_norm * (1 + 1e-5) for after, _ in seen), seen
    assert any(before > max_norm for _, before in seen)  # the clip really acted
    rows = rows_of(model)
    assert all(float(r["train/grad_norm"]) > 0 for r in rows)


# 4 under DDP ----------------------------------------------------------------------------------
def test_unfreeze_on_two_workers_keeps_ranks_in_sync_and_val_matches_one_process(ray_session, work, tmp_path):
    """After unfreezing, DDP must synchronise the backbone too; 2-rank metrics equal 1-process ones."""
    log = tmp_path / "weights.jsonl"

    def record(trainer):
        w = unwrap_model(trainer.model).model[0].conv.weight.detach()
        with open(log, "a") as f:
            f.write(json.dumps({"rank": trainer.rank, "epoch": trainer.epoch, "final": trainer.final_eval,
                                "w": w.flatten()[:64].tolist()}) + "\n")

    class Recording(custom_unfreeze.UnfreezeTrainer):
        unfreeze_after = 1

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.add_callback("on_fit_epoch_end", record)

    model = custom_unfreeze.main(**work["run"], epochs=2, freeze=10, optimizer="AdamW", lr0=0.003,
                                 trainer=Recording, num_workers=2, name="unfreeze_ddp")
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    by = {(r["rank"], r["epoch"]): r["w"] for r in rows if not r["final"]}
    assert set(by) == {(0, 0), (1, 0), (0, 1), (1, 1)}
    assert by[(0, 0)] == by[(1, 0)] and by[(0, 1)] == by[(1, 1)]  # identical on both ranks
    assert by[(0, 1)] != by[(0, 0)]  # and the backbone did train after unfreezing
    trained = model.metrics  # the final evaluation on 2 ranks, rebuilt from rank 0's record (SPEC §6)
    ddp_metrics = {k: v for k, v in trained.items() if k.startswith("metrics/")}
    one = model.val(data=work["run"]["data"], batch=16, verbose=False, plots=False)
    for key, value in ddp_metrics.items():
        assert one[key] == pytest.approx(value, abs=1e-6), key
    assert trained.box.ap_class_index.tolist() == one.box.ap_class_index.tolist()
    for name in ("p", "r", "ap50", "ap"):
        assert getattr(trained.box, name) == pytest.approx(getattr(one.box, name), abs=1e-6), name
    assert trained.box.map50 == trained["metrics/mAP50(B)"] and trained.box.map == trained["metrics/mAP50-95(B)"]
