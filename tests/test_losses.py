"""Detection/classification losses, the assigner, IoU and NMS on real tensors."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainers.losses import ClassificationLoss, DetectionLoss
from trainers.losses.assigner import TaskAlignedAssigner
from trainers.losses.iou import box_iou_pairs, complete_iou
from trainers.models import DetectionModel
from trainers.utils import UserError
from trainers.utils.ops import box_iou, nms, non_max_suppression

def shapes_batch(size: int = 64) -> dict:
    """Two images with bright rectangles on a dark background; labels match the drawing."""
    img = torch.full((2, 3, size, size), 0.1)
    labels = [(0, 0, 0.30, 0.35, 0.30, 0.40), (0, 1, 0.72, 0.70, 0.40, 0.30),
              (1, 1, 0.50, 0.50, 0.50, 0.50)]
    for b, c, cx, cy, w, h in labels:
        x1, y1 = int((cx - w / 2) * size), int((cy - h / 2) * size)
        x2, y2 = int((cx + w / 2) * size), int((cy + h / 2) * size)
        img[b, c, y1:y2, x1:x2] = 0.9
    t = torch.tensor(labels)
    return {"img": img, "batch_idx": t[:, 0], "cls": t[:, 1:2], "bboxes": t[:, 2:]}


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return DetectionModel("det-n.yaml", nc=2, verbose=False)


def test_loss_contract(model):
    loss, items = model.loss(shapes_batch())
    assert loss.ndim == 0 and loss.requires_grad and torch.isfinite(loss)
    assert items.shape == (3,) and not items.requires_grad
    assert torch.allclose(loss.detach(), items.sum())
    assert model.loss_names == ("box_loss", "cls_loss", "dfl_loss")
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert isinstance(model.criterion, DetectionLoss)
    assert model.criterion.device == next(model.parameters()).device


def test_eval_preds_give_same_loss(model):
    model.eval()
    batch = shapes_batch()
    with torch.no_grad():
        preds = model(batch["img"])
        loss_tuple, _ = model.loss(batch, preds)
        loss_raw, _ = model.loss(batch, preds[1])
    assert torch.allclose(loss_tuple, loss_raw)


def test_overfitting_one_batch_learns_boxes_and_classes(model):
    batch = shapes_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    first, _ = model.loss(batch)
    for _ in range(100):
        loss, items = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.4 * first.item(), (first.item(), loss.item())
    model.eval()
    with torch.no_grad():
        dets = non_max_suppression(model(batch["img"])[0], conf=0.25, iou=0.5)
    size = batch["img"].shape[-1]
    for b in range(2):
        mine = batch["batch_idx"] == b
        gt = torch.cat((batch["bboxes"][mine, :2] - batch["bboxes"][mine, 2:] / 2,
                        batch["bboxes"][mine, :2] + batch["bboxes"][mine, 2:] / 2), 1) * size
        assert len(dets[b]) >= 1
        iou = box_iou(gt, dets[b][:, :4])
        best = iou.max(1)
        assert (best.values > 0.5).all(), best.values
        assert torch.equal(dets[b][best.indices, 5].long(), batch["cls"][mine, 0].long())


def eval_preds(model):
    """A shapes batch and the model's eval-mode predictions for it."""
    batch = shapes_batch()
    model.eval()
    with torch.no_grad():
        return batch, model(batch["img"])


@torch.no_grad()
def loss_items(model, batch, preds):
    return model.loss(batch, preds)[1]


def test_pos_weight_bce_changes_only_class_loss(model):
    batch, preds = eval_preds(model)
    plain = loss_items(model, batch, preds)
    model.criterion.bce = nn.BCEWithLogitsLoss(reduction="none", pos_weight=torch.tensor([1.0, 20.0]))
    weighted = loss_items(model, batch, preds)
    assert weighted[1] > plain[1] * 1.5
    assert torch.allclose(weighted[[0, 2]], plain[[0, 2]])


def test_gains_follow_model_args(model):
    batch, preds = eval_preds(model)
    default = loss_items(model, batch, preds)
    model.args = SimpleNamespace(box=15.0, cls=0.0, dfl=1.5)
    model.criterion = model.init_criterion()
    scaled = loss_items(model, batch, preds)
    model.args = {"box": 7.5, "cls": 1.0, "dfl": 0.0}  # set after the criterion exists
    from_dict = loss_items(model, batch, preds)
    assert torch.allclose(scaled[0], 2 * default[0]) and scaled[1] == 0
    assert torch.allclose(from_dict[1], 2 * default[1]) and from_dict[2] == 0


def test_loss_under_autocast_is_full_precision(model):
    batch = shapes_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        preds = model(batch["img"])
        loss, items = model.loss(batch, preds)
    assert preds[0].dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and items.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()


def test_images_without_labels(model):
    batch = shapes_batch()
    batch.update(cls=torch.zeros(0, 1), bboxes=torch.zeros(0, 4), batch_idx=torch.zeros(0))
    loss, items = model.loss(batch)
    assert torch.isfinite(loss) and items[0] == 0 and items[2] == 0 and items[1] > 0
    loss.backward()


def test_label_out_of_range_is_user_error(model):
    batch = shapes_batch()
    batch["cls"] = batch["cls"] + 5
    with pytest.raises(UserError, match="label class 6 .* nc=2"):
        model.loss(batch)


def test_classification_loss_is_cross_entropy():
    logits = torch.randn(5, 4, requires_grad=True)
    target = torch.tensor([0, 3, 1, 1, 2])
    loss, items = ClassificationLoss()(logits, {"cls": target})
    assert torch.allclose(loss, F.cross_entropy(logits, target))
    assert items.shape == (1,) and not items.requires_grad


# ---------------------------------------------------------------- assigner and IoU

def test_assigner_hand_built():
    # anchors at x = 5, 15, 25, 35 on y = 5; two boxes, one overlapping anchor (x=15)
    points = torch.tensor([[5.0, 5.0], [15.0, 5.0], [25.0, 5.0], [35.0, 5.0]])
    gt = torch.tensor([[[0.0, 0.0, 20.0, 10.0], [10.0, 0.0, 30.0, 10.0]]])
    labels = torch.tensor([[0, 1]])
    # predictions: anchor 1 predicts the second box exactly
    pred = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 30.0, 10.0],
                          [20.0, 0.0, 30.0, 10.0], [30.0, 0.0, 40.0, 10.0]]])
    scores = torch.full((1, 4, 2), 0.5)
    t_labels, t_boxes, t_scores, fg = TaskAlignedAssigner(topk=3)(
        scores, pred, points, labels, gt, torch.tensor([[True, True]]))
    assert fg.tolist() == [[True, True, True, False]]
    assert t_labels[0, :3].tolist() == [0, 1, 1]  # the shared anchor goes to the box it fits
    assert torch.equal(t_boxes[0, 1], gt[0, 1])
    assert t_scores[0, 3].sum() == 0 and t_scores[0, 0, 1] == 0
    # soft targets: alignment scaled so each box's best anchor gets that box's best IoU
    assert torch.isclose(t_scores[0, 1, 1], torch.tensor(1.0))  # box 2: IoU 1
    assert torch.isclose(t_scores[0, 2, 1], torch.tensor(0.5 ** 6))  # IoU 0.5 -> (0.5/1)^beta
    assert torch.isclose(t_scores[0, 0, 0], torch.tensor(0.5))  # box 1's only anchor, IoU 0.5


def test_assigner_ignores_padding():
    points = torch.tensor([[5.0, 5.0], [15.0, 5.0]])
    gt = torch.tensor([[[0.0, 0.0, 20.0, 10.0]]])
    out = TaskAlignedAssigner()(torch.full((1, 2, 1), 0.5), gt.expand(1, 2, 4).clone(), points,
                                torch.tensor([[0]]), gt, torch.tensor([[False]]))
    assert not out[3].any() and out[2].sum() == 0


def test_iou_family():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    assert torch.allclose(box_iou_pairs(a, a), torch.ones(1))
    assert torch.allclose(complete_iou(a, a), torch.ones(1), atol=1e-6)
    shifted = torch.tensor([[5.0, 0.0, 15.0, 10.0]])
    assert torch.allclose(box_iou_pairs(a, shifted), torch.tensor([1 / 3]))
    far = torch.tensor([[20.0, 0.0, 30.0, 10.0]])
    assert box_iou_pairs(a, far) == 0 and complete_iou(a, far) < 0
    # same centre and aspect: CIoU equals IoU
    inner = torch.tensor([[2.5, 2.5, 7.5, 7.5]])
    assert torch.allclose(complete_iou(a, inner), box_iou_pairs(a, inner))
    wide = torch.tensor([[-5.0, 2.5, 15.0, 7.5]])
    assert complete_iou(a, wide) < box_iou_pairs(a, wide)  # aspect mismatch penalised
    assert math.isclose(float(box_iou(a, shifted)), 1 / 3, rel_tol=1e-5)


# ---------------------------------------------------------------- NMS

def test_nms_hand_built():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0],    # 0: best of the first cluster
                          [3.0, 0.0, 13.0, 10.0],    # 1: overlaps 0 (IoU 0.54) -> dropped
                          [50.0, 50.0, 60.0, 60.0],  # 2: alone -> kept
                          [6.0, 0.0, 16.0, 10.0],    # 3: overlaps only 1 (dropped) -> kept
                          [0.0, 0.0, 10.0, 9.0]])    # 4: overlaps 0 (IoU 0.9) -> dropped
    scores = torch.tensor([0.9, 0.8, 0.3, 0.7, 0.6])
    assert nms(boxes, scores, 0.5).tolist() == [0, 3, 2]
    assert nms(boxes, scores, 0.95).tolist() == [0, 1, 3, 4, 2]
    assert nms(boxes[:0], scores[:0], 0.5).numel() == 0


def test_non_max_suppression_per_class_conf_and_max_det():
    # decoded (1, 4 + 2, 4): xywh pixels + class probabilities
    xywh = torch.tensor([[5.0, 5.0, 10.0, 10.0], [6.0, 5.0, 10.0, 10.0],
                         [5.0, 5.0, 10.0, 10.0], [40.0, 40.0, 8.0, 8.0]])
    probs = torch.tensor([[0.9, 0.0], [0.8, 0.1], [0.1, 0.7], [0.05, 0.1]])
    preds = torch.cat((xywh, probs), 1).t()[None]
    out = non_max_suppression(preds, conf=0.25, iou=0.5)[0]
    assert out.shape == (2, 6)
    assert out[:, 5].tolist() == [0.0, 1.0]  # same place, other class survives
    assert torch.allclose(out[0, :4], torch.tensor([0.0, 0.0, 10.0, 10.0]))
    assert torch.allclose(out[:, 4], torch.tensor([0.9, 0.7]))
    assert len(non_max_suppression(preds, conf=0.25, iou=0.5, max_det=1)[0]) == 1
    assert len(non_max_suppression(preds, conf=0.95)[0]) == 0


def test_nms_matches_sequential_greedy():
    def greedy(boxes, scores, thr):
        order = scores.argsort(descending=True)
        iou = box_iou(boxes[order], boxes[order])
        keep = torch.ones(len(order), dtype=torch.bool)
        for i in range(len(order)):
            if keep[i]:
                drop = iou[i] > thr
                drop[: i + 1] = False
                keep &= ~drop
        return order[keep]

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(1, 120, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 60
        boxes = torch.cat((xy, xy + torch.rand(n, 2, generator=g) * 30 + 1), 1)
        scores = torch.rand(n, generator=g)
        thr = float(torch.rand(1, generator=g)) * 0.8 + 0.1
        assert torch.equal(nms(boxes, scores, thr), greedy(boxes, scores, thr))
