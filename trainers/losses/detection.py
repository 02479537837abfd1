"""Detection loss: CIoU box loss, BCE class loss and distribution focal loss (DFL)
over task-aligned targets. ``loss`` is the sum of the three gained parts; each part is
normalised by the total target strength, so its scale does not depend on the batch size."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainers.models.modules import dist2bbox, make_anchors
from trainers.utils import UserError
from trainers.utils.ops import xywh2xyxy

from .assigner import TaskAlignedAssigner
from .iou import complete_iou

DEFAULT_GAINS = {"box": 7.5, "cls": 0.5, "dfl": 1.5}


class DetectionLoss:
    """``criterion(preds, batch) -> (loss, loss_items)`` for a model whose last layer is ``Detect``.

    ``self.bce`` (reduction ``none``) scores class targets; replace it, e.g. with
    ``nn.BCEWithLogitsLoss(reduction="none", pos_weight=w)`` for class weights (``w`` of
    shape ``(nc,)``). Gains come from ``model.args.box/cls/dfl`` when the trainer set them.
    """

    def __init__(self, model: nn.Module, topk: int = 10):
        head = model.model[-1]
        self.device = next(model.parameters()).device
        self.hyp = getattr(model, "args", None)
        self.nc = head.nc
        self.reg_max = head.reg_max
        self.stride = head.stride.detach().clone().float()
        self.bce = nn.BCEWithLogitsLoss(reduction="none")
        self.assigner = TaskAlignedAssigner(topk=topk)

    def gain(self, name: str) -> float:
        """``hyp.<name>`` from the trainer's args (namespace or dict), else the default."""
        hyp = self.hyp
        value = hyp.get(name) if isinstance(hyp, dict) else getattr(hyp, name, None)
        return DEFAULT_GAINS[name] if value is None else float(value)

    def __call__(self, preds, batch: dict):
        feats = preds[1] if isinstance(preds, tuple) else preds
        with torch.autocast(feats[0].device.type, enabled=False):  # targets need full precision
            return self._loss([f.float() for f in feats], batch)

    def _loss(self, feats: list[torch.Tensor], batch: dict):
        self.device = feats[0].device
        self.bce.to(self.device)  # a swapped-in pos_weight follows the model's device
        flat = torch.cat([f.flatten(2) for f in feats], 2).transpose(1, 2)  # (B, A, no)
        pred_dist, pred_logits = flat.split((4 * self.reg_max, self.nc), 2)
        points, strides = make_anchors([tuple(f.shape[2:]) for f in feats], self.stride.to(self.device))
        pred_boxes = dist2bbox(self._decode(pred_dist), points, xywh=False)  # stride units

        h, w = batch["img"].shape[2:]
        gt_labels, gt_bboxes, mask_gt = self._targets(batch, flat.shape[0], (h, w))
        _, t_boxes, t_scores, fg = self.assigner(
            pred_logits.detach().sigmoid(), pred_boxes.detach() * strides,
            points * strides, gt_labels, gt_bboxes, mask_gt)
        norm = t_scores.sum().clamp(min=1.0)

        cls_loss = self.bce(pred_logits, t_scores).sum() / norm
        box_loss, dfl_loss = self._box_losses(pred_dist, pred_boxes, points, t_boxes / strides,
                                              t_scores, fg, norm)
        items = torch.stack((box_loss * self.gain("box"), cls_loss * self.gain("cls"),
                             dfl_loss * self.gain("dfl")))
        return items.sum(), items.detach()

    def _decode(self, pred_dist: torch.Tensor) -> torch.Tensor:
        """(B, A, 4*reg_max) -> (B, A, 4) expected ltrb distances in stride units."""
        if self.reg_max == 1:
            return pred_dist.relu()
        b, a, _ = pred_dist.shape
        bins = torch.arange(self.reg_max, device=pred_dist.device, dtype=pred_dist.dtype)
        return pred_dist.view(b, a, 4, self.reg_max).softmax(-1) @ bins

    def _box_losses(self, pred_dist, pred_boxes, points, t_boxes, t_scores, fg, norm):
        """CIoU and DFL over the positive anchors, weighted by their target strength."""
        if not fg.any():  # keep the graph connected so DDP sees every parameter used
            zero = pred_dist.sum() * 0.0
            return zero, zero
        weight = t_scores.sum(-1)[fg]
        iou = complete_iou(pred_boxes[fg], t_boxes[fg])
        box_loss = ((1.0 - iou) * weight).sum() / norm
        if self.reg_max == 1:
            return box_loss, pred_dist.sum() * 0.0
        lt, rb = (points[None] - t_boxes[..., :2]), (t_boxes[..., 2:] - points[None])
        target = torch.cat((lt, rb), -1)[fg].clamp(0, self.reg_max - 1 - 0.01)
        dfl = self._dfl(pred_dist[fg].view(-1, self.reg_max), target.view(-1)).view(-1, 4).mean(-1)
        return box_loss, (dfl * weight).sum() / norm

    @staticmethod
    def _dfl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross entropy spread over the two bins around a continuous target distance."""
        left = target.long()
        w_right = target - left
        return (F.cross_entropy(logits, left, reduction="none") * (1 - w_right)
                + F.cross_entropy(logits, left + 1, reduction="none") * w_right)

    def _targets(self, batch: dict, bs: int, imgsz: tuple[int, int]):
        """Pad the flat label list to (B, M): labels, xyxy pixel boxes, and a validity mask."""
        idx = batch["batch_idx"].to(self.device).view(-1).long()
        cls = batch["cls"].to(self.device).view(-1).long()
        boxes = batch["bboxes"].to(self.device).view(-1, 4).float()
        n = idx.numel()
        if n and int(cls.max()) >= self.nc:
            raise UserError(f"label class {int(cls.max())} is out of range for a model with "
                            f"nc={self.nc} (valid: 0..{self.nc - 1})")
        counts = torch.bincount(idx, minlength=bs)
        m = int(counts.max()) if n else 0
        labels = torch.zeros(bs, m, dtype=torch.long, device=self.device)
        xyxy = torch.zeros(bs, m, 4, device=self.device)
        mask = torch.zeros(bs, m, dtype=torch.bool, device=self.device)
        if n:
            order = torch.argsort(idx, stable=True)
            idx, cls, boxes = idx[order], cls[order], boxes[order]
            slot = torch.arange(n, device=self.device) - (counts.cumsum(0) - counts)[idx]
            scale = torch.tensor([imgsz[1], imgsz[0], imgsz[1], imgsz[0]], device=self.device)
            labels[idx, slot] = cls
            xyxy[idx, slot] = xywh2xyxy(boxes * scale)
            mask[idx, slot] = True
        return labels, xyxy, mask
