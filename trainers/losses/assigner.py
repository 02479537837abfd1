"""Task-aligned target assignment: which anchor points learn which ground-truth box.

An anchor is a candidate for a box when its centre lies inside the box. Each box keeps its
``topk`` candidates ranked by ``score**alpha * iou**beta`` (how well the current prediction
already classifies *and* localises it), so assignment follows what the head can learn. An
anchor claimed by several boxes goes to the one it overlaps most. Soft class targets are
the alignment scaled so each box's best anchor gets that box's best IoU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .iou import box_iou_pairs


class TaskAlignedAssigner:
    def __init__(self, topk: int = 10, alpha: float = 0.5, beta: float = 6.0, eps: float = 1e-9):
        self.topk, self.alpha, self.beta, self.eps = topk, alpha, beta, eps

    @torch.no_grad()
    def __call__(self, pd_scores, pd_bboxes, points, gt_labels, gt_bboxes, mask_gt):
        """Targets for one batch.

        Args: pd_scores (B, A, C) probabilities, pd_bboxes (B, A, 4) xyxy, points (A, 2)
        anchor centres (same units as the boxes), gt_labels (B, M) long, gt_bboxes (B, M, 4)
        xyxy, mask_gt (B, M) bool (False for padding).
        Returns: labels (B, A) long, bboxes (B, A, 4), scores (B, A, C), fg (B, A) bool.
        """
        b, a, c = pd_scores.shape
        if gt_bboxes.shape[1] == 0:
            return (torch.zeros(b, a, dtype=torch.long, device=pd_scores.device),
                    pd_bboxes.new_zeros(b, a, 4), pd_scores.new_zeros(b, a, c),
                    torch.zeros(b, a, dtype=torch.bool, device=pd_scores.device))
        inside = self._centres_inside(points, gt_bboxes) & mask_gt[..., None]  # (B, M, A)
        iou = box_iou_pairs(gt_bboxes[:, :, None], pd_bboxes[:, None]).clamp(min=0) * inside
        score = pd_scores.transpose(1, 2).gather(1, gt_labels[..., None].expand(-1, -1, a))
        align = score.pow(self.alpha) * iou.pow(self.beta) * inside
        cand = self._topk_candidates(align, inside)
        owner = torch.where(cand, iou, torch.full_like(iou, -1.0)).argmax(1)  # (B, A)
        fg = cand.any(1)
        pos = F.one_hot(owner, gt_bboxes.shape[1]).transpose(1, 2).bool() & fg[:, None]
        labels = gt_labels.gather(1, owner)
        bboxes = gt_bboxes.gather(1, owner[..., None].expand(-1, -1, 4))
        scores = F.one_hot(labels, c).to(pd_scores.dtype) * self._soft_scale(align, iou, pos)[..., None]
        return labels, bboxes, scores, fg

    def _centres_inside(self, points, gt_bboxes):
        """(B, M, A): anchor centre strictly inside each box."""
        lt = points[None, None] - gt_bboxes[..., None, :2]
        rb = gt_bboxes[..., None, 2:] - points[None, None]
        return torch.cat((lt, rb), -1).amin(-1) > self.eps

    def _topk_candidates(self, align, inside):
        """(B, M, A) bool: each box's ``topk`` inside anchors by alignment."""
        k = min(self.topk, align.shape[-1])
        ranked = align.masked_fill(~inside, -1.0)  # inside anchors outrank outside ones
        idx = ranked.topk(k, dim=-1).indices
        chosen = torch.zeros_like(inside).scatter_(-1, idx, True)
        return chosen & inside

    def _soft_scale(self, align, iou, pos):
        """(B, A): per-anchor target strength, alignment normalised per box to its best IoU."""
        align = align * pos
        best_align = align.amax(-1, keepdim=True)
        best_iou = (iou * pos).amax(-1, keepdim=True)
        return (align * best_iou / (best_align + self.eps)).amax(1)
