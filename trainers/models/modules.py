"""Layer blocks the YAML specs are built from.

Every block takes its input channels first (``c1``) and its output channels second (``c2``)
so ``parse_model`` can wire them without knowing each block's internals.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def autopad(k: int, p: int | None = None, d: int = 1) -> int:
    """Padding that keeps the spatial size for odd kernels (stride 1)."""
    if p is not None:
        return p
    return d * (k - 1) // 2


class Conv(nn.Module):
    """Conv2d -> BatchNorm2d -> SiLU; parts named ``conv``, ``bn``, ``act`` (SPEC section 5)."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None,
                 g: int = 1, act: bool | nn.Module = True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        if act is True:
            self.act = nn.SiLU()
        elif isinstance(act, nn.Module):
            self.act = act
        else:
            self.act = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two 3x3 convs with an optional residual add (only when shapes allow it)."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, e: float = 1.0):
        super().__init__()
        hidden = max(int(c2 * e), 1)
        self.cv1 = Conv(c1, hidden, 3)
        self.cv2 = Conv(hidden, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class CSP(nn.Module):
    """Cross-stage block: split, run ``n`` bottlenecks on one half, concat every stage.

    Keeping every intermediate output gives the next 1x1 conv many gradient paths at a
    small cost, which is what lets tiny widths still train well.
    """

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, e: float = 0.5):
        super().__init__()
        self.c = max(int(c2 * e), 1)
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.cv1(x).chunk(2, 1))
        for block in self.m:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling by repeated max-pools: large receptive field, few FLOPs."""

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        hidden = c1 // 2
        self.cv1 = Conv(c1, hidden, 1)
        self.cv2 = Conv(hidden * 4, c2, 1)
        self.pool = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.pool(y[-1]))
        return self.cv2(torch.cat(y, 1))


class Concat(nn.Module):
    """Concatenate a list of tensors along ``dimension`` (channels by default)."""

    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)


class Classify(nn.Module):
    """Classification head: 1x1 conv, global average pool, dropout, linear -> logits (B, nc)."""

    def __init__(self, c1: int, c2: int, c_hidden: int = 256, dropout: float = 0.0):
        super().__init__()
        self.conv = Conv(c1, c_hidden, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(p=dropout)
        self.linear = nn.Linear(c_hidden, c2)

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        if isinstance(x, list):
            x = torch.cat(x, 1)
        return self.linear(self.drop(self.pool(self.conv(x)).flatten(1)))


class DFL(nn.Module):
    """Expected value of a per-side distribution over ``reg_max`` distance bins.

    The bin values live in a non-persistent buffer, so nothing here is trainable and
    nothing needs freezing or checkpointing.
    """

    def __init__(self, reg_max: int = 16):
        super().__init__()
        self.reg_max = reg_max
        self.register_buffer("bins", torch.arange(reg_max, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 4*reg_max, A) logits -> (B, 4, A) distances in stride units."""
        b, _, a = x.shape
        prob = x.view(b, 4, self.reg_max, a).softmax(2)
        return (prob * self.bins.view(1, 1, -1, 1).to(prob.dtype)).sum(2)


def make_anchors(shapes: list[tuple[int, int]], strides: torch.Tensor, offset: float = 0.5):
    """Cell-centre points (A, 2) in stride units and per-point strides (A, 1)."""
    points, point_strides = [], []
    for i, (h, w) in enumerate(shapes):
        s = strides[i]
        ys = torch.arange(h, device=strides.device, dtype=strides.dtype) + offset
        xs = torch.arange(w, device=strides.device, dtype=strides.dtype) + offset
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((gx, gy), -1).view(-1, 2))
        point_strides.append(s.expand(h * w, 1))
    return torch.cat(points), torch.cat(point_strides)


def dist2bbox(distance: torch.Tensor, points: torch.Tensor, xywh: bool = True, dim: int = -1):
    """Left/top/right/bottom distances from ``points`` -> boxes (xywh or xyxy)."""
    lt, rb = distance.chunk(2, dim)
    x1y1, x2y2 = points - lt, points + rb
    if xywh:
        return torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), dim)
    return torch.cat((x1y1, x2y2), dim)


def _prior_logit(p: float) -> float:
    return -math.log((1 - p) / p)


class Detect(nn.Module):
    """Anchor-free detection head: one box branch and one class branch per level.

    Training mode returns the raw per-level maps ``(B, 4*reg_max + nc, H, W)``. Eval mode
    decodes them to ``(B, 4 + nc, A)`` (xywh in input pixels, class probabilities) and
    returns ``(decoded, raw)``, or ``decoded`` alone when ``export`` is set.
    ``stride`` is filled in by the model after a dry run.
    """

    export = False

    def __init__(self, nc: int = 80, ch: tuple[int, ...] = (), reg_max: int = 16):
        super().__init__()
        self.nc = nc
        self.nl = len(ch)
        self.reg_max = reg_max
        self.no = nc + 4 * reg_max
        c_box = max(16, ch[0] // 4, 4 * reg_max)
        c_cls = max(ch[0] // 2, min(nc, 64), 16)
        self.cv2 = nn.ModuleList(self._branch(c, c_box, 4 * reg_max) for c in ch)
        self.cv3 = nn.ModuleList(self._branch(c, c_cls, nc) for c in ch)
        self.dfl = DFL(reg_max) if reg_max > 1 else nn.Identity()
        self.register_buffer("stride", torch.zeros(self.nl), persistent=False)

    @staticmethod
    def _branch(c1: int, c_mid: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(Conv(c1, c_mid, 3), Conv(c_mid, c_mid, 3), nn.Conv2d(c_mid, c_out, 1))

    def forward(self, x: list[torch.Tensor]):
        raw = [torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])), 1) for i in range(self.nl)]
        if self.training:
            return raw
        decoded = self.decode(raw)
        return decoded if self.export else (decoded, raw)

    def decode(self, raw: list[torch.Tensor]) -> torch.Tensor:
        """Raw per-level maps -> (B, 4 + nc, A): xywh pixels and sigmoid class scores."""
        shapes = [r.shape[2:] for r in raw]
        points, strides = make_anchors(shapes, self.stride.to(raw[0].dtype))
        flat = torch.cat([r.flatten(2) for r in raw], 2)
        box, cls = flat.split((4 * self.reg_max, self.nc), 1)
        dist = self.dfl(box) if self.reg_max > 1 else box.relu()
        xywh = dist2bbox(dist, points.t().unsqueeze(0), xywh=True, dim=1) * strides.t()
        return torch.cat((xywh, cls.sigmoid()), 1)

    def bias_init(self) -> None:
        """Start box logits flat and class scores at a 1% prior, so early losses are sane."""
        for box, cls in zip(self.cv2, self.cv3):
            nn.init.constant_(box[-1].bias, 1.0)
            nn.init.constant_(cls[-1].bias, _prior_logit(0.01))
