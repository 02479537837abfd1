"""Box helpers shared by data, losses, metrics and prediction (no torchvision needed)."""
from __future__ import annotations

import torch


def xywh2xyxy(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    y[..., 0] = x[..., 0] - x[..., 2] / 2
    y[..., 1] = x[..., 1] - x[..., 3] / 2
    y[..., 2] = x[..., 0] + x[..., 2] / 2
    y[..., 3] = x[..., 1] + x[..., 3] / 2
    return y


def xyxy2xywh(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes: (N,4) x (M,4) -> (N,M)."""
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(2)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)
    return inter / (area_a[:, None] + area_b[None, :] - inter + eps)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_thres: float) -> torch.Tensor:
    """Indices kept by greedy non-maximum suppression, highest score first.

    Greedy NMS keeps box i iff no *kept* higher-scored box overlaps it above the threshold.
    That rule has one solution; iterating it from "keep all" reaches it in as many rounds
    as the longest suppression chain (usually a handful), each round one matrix op instead
    of one Python step per box.
    """
    order = scores.argsort(descending=True)
    if order.numel() == 0:
        return order
    b = boxes[order].float()
    over = (box_iou(b, b) > iou_thres).triu(1).float()  # [j, i] = 1: j outranks and overlaps i
    keep = torch.ones(order.numel(), dtype=torch.bool, device=boxes.device)
    for _ in range(order.numel()):
        new_keep = (keep.float() @ over) == 0  # no kept box suppresses i
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return order[keep]


def non_max_suppression(preds: torch.Tensor, conf: float = 0.25, iou: float = 0.7,
                        max_det: int = 300, max_nms: int = 3000) -> list[torch.Tensor]:
    """Per-image detections ``(n, 6)`` = xyxy, conf, cls from decoded ``(B, 4+nc, A)`` preds.

    Boxes come in as xywh pixels; classes are suppressed separately (offset trick).
    """
    out = []
    for p in preds.transpose(1, 2):  # (A, 4+nc)
        scores, cls = p[:, 4:].max(1)
        keep = scores > conf
        boxes, scores, cls = xywh2xyxy(p[keep, :4]), scores[keep], cls[keep]
        if scores.numel() > max_nms:
            top = scores.topk(max_nms).indices
            boxes, scores, cls = boxes[top], scores[top], cls[top]
        offset = cls[:, None].float() * 4096.0
        kept = nms(boxes + offset, scores, iou)[:max_det]
        out.append(torch.cat([boxes[kept], scores[kept, None], cls[kept, None].float()], 1))
    return out
