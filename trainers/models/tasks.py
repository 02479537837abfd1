"""Task models: a spec-built layer list plus the task's loss, weight loading and metadata."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from trainers.utils import LOGGER, UserError

from .build import load_spec, parse_model
from .modules import Detect


class BaseModel(nn.Module):
    """Layers in ``self.model`` (so parameter names read ``model.<i>.<...>``), run in order.

    Subclasses say which criterion they train with (``init_criterion``) and which loss
    names it reports (``loss_names``).
    """

    loss_names: tuple[str, ...] = ("loss",)

    def __init__(self, cfg: str | Path | dict, nc: int | None = None, verbose: bool = True,
                 ch: int = 3):
        super().__init__()
        self.yaml = load_spec(cfg)
        ch = self.yaml["ch"] = int(self.yaml.get("ch", ch))  # a saved spec knows its channels
        if nc is not None and nc != self.yaml.get("nc"):
            if verbose and "nc" in self.yaml:
                LOGGER.info(f"Overriding spec nc={self.yaml['nc']} with nc={nc}")
            self.yaml["nc"] = int(nc)
        if "nc" not in self.yaml:
            raise UserError(f"model spec {self.yaml.get('yaml_file', '<dict>')}: no 'nc' "
                            "(number of classes) in the spec and none given")
        self.nc = int(self.yaml["nc"])
        self.model, self.save = parse_model(self.yaml, ch=ch, nc=self.nc, verbose=verbose)
        self.names = {i: str(i) for i in range(self.nc)}
        self.criterion = None

    def forward(self, x, *args, **kwargs):
        """Images -> predictions; a batch dict -> ``(loss, loss_items)`` (the DDP-friendly path)."""
        if isinstance(x, dict):
            return self.loss(x, *args, **kwargs)
        return self._forward_layers(x)

    def _forward_layers(self, x: torch.Tensor):
        outputs: list = []
        for layer in self.model:
            if layer.f != -1:
                x = outputs[layer.f] if isinstance(layer.f, int) else [
                    x if j == -1 else outputs[j] for j in layer.f]
            x = layer(x)
            outputs.append(x if layer.i in self.save else None)
        return x

    def loss(self, batch: dict, preds=None):
        """``(loss, loss_items)``: scalar per-sample-mean loss and its detached parts."""
        if self.criterion is None:
            self.criterion = self.init_criterion()
        if hasattr(self.criterion, "hyp") and getattr(self, "args", None) is not None:
            self.criterion.hyp = self.args  # gains follow args set after the criterion was built
        if preds is None:
            preds = self.forward(batch["img"])
        return self.criterion(preds, batch)

    def init_criterion(self):
        """The callable ``criterion(preds, batch) -> (loss, loss_items)`` for this task."""
        raise NotImplementedError(f"{type(self).__name__} must define init_criterion()")

    def load(self, weights, verbose: bool = True) -> "BaseModel":
        """Copy every tensor whose name and shape match from a checkpoint path, a checkpoint
        dict, a state dict or a model; the rest keep their current values."""
        source = _state_dict_of(weights)
        own = self.state_dict()
        matched = {k: v for k, v in source.items()
                   if k in own and torch.is_tensor(v) and v.shape == own[k].shape}
        self.load_state_dict(matched, strict=False)
        if verbose:
            LOGGER.info(f"Transferred {len(matched)}/{len(own)} items from pretrained weights")
        return self

    def info(self) -> str:
        """One-line summary: layers, parameters."""
        n_p = sum(p.numel() for p in self.parameters())
        return f"{type(self).__name__}: {len(self.model)} layers, {n_p:,} parameters"

    def __getstate__(self):
        # the criterion is rebuilt lazily; dropping it keeps pickles small and
        # free of whatever a custom loss holds
        state = self.__dict__.copy()
        state["criterion"] = None
        return state


def _state_dict_of(weights) -> Mapping[str, torch.Tensor]:
    """Accept a path, a checkpoint dict (``ema`` preferred, then ``model``), a state dict or a module."""
    if isinstance(weights, nn.Module):
        return weights.state_dict()
    if isinstance(weights, (str, Path)):
        path = Path(weights)
        if not path.is_file():
            raise UserError(f"weights file '{weights}' not found")
        try:
            weights = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - corrupt or foreign file: one clear line
            raise UserError(f"weights file '{path}' cannot be loaded: {e}".splitlines()[0]) from None
    if not isinstance(weights, Mapping):
        raise UserError(f"cannot load weights from a {type(weights).__name__}")
    for key in ("ema", "model", "state_dict"):
        inner = weights.get(key)
        if isinstance(inner, nn.Module):
            return inner.state_dict()
        if isinstance(inner, Mapping) and inner:
            return inner
    return weights


class ClassificationModel(BaseModel):
    """Small CNN classifier: images (B, ch, H, W) -> logits (B, nc)."""

    loss_names = ("loss",)

    def __init__(self, cfg: str | Path | dict = "cls-n.yaml", nc: int | None = None, verbose: bool = True,
                 ch: int = 3):
        super().__init__(cfg, ch=ch, nc=nc, verbose=verbose)
        if verbose:
            LOGGER.info(self.info())

    def init_criterion(self):
        from trainers.losses.classify import ClassificationLoss
        return ClassificationLoss()


class DetectionModel(BaseModel):
    """Anchor-free detector. Training forward -> per-level raw maps; eval forward ->
    ``(decoded (B, 4+nc, A), raw)``, or ``decoded`` alone when ``model.export`` is True."""

    loss_names = ("box_loss", "cls_loss", "dfl_loss")

    def __init__(self, cfg: str | Path | dict = "det-n.yaml", nc: int | None = None, verbose: bool = True,
                 ch: int = 3):
        super().__init__(cfg, ch=ch, nc=nc, verbose=verbose)
        head = self.model[-1]
        if not isinstance(head, Detect):
            raise UserError(f"model spec {self.yaml.get('yaml_file', '<dict>')}: the last "
                            "layer of a detection spec must be Detect")
        head.stride.copy_(self._measure_strides(ch))
        head.bias_init()
        if verbose:
            LOGGER.info(self.info())

    def _measure_strides(self, ch: int, size: int = 256) -> torch.Tensor:
        """Input size / feature-map size of each head level, from one dry run."""
        was_training = self.training
        self.eval()  # eval leaves BatchNorm statistics untouched
        with torch.no_grad():
            _, maps = self._forward_layers(torch.zeros(1, ch, size, size))
        self.train(was_training)
        return torch.tensor([size / m.shape[-2] for m in maps], dtype=torch.float32)

    @property
    def stride(self) -> torch.Tensor:
        return self.model[-1].stride

    @property
    def export(self) -> bool:
        return self.model[-1].export

    @export.setter
    def export(self, value: bool) -> None:
        self.model[-1].export = bool(value)

    def init_criterion(self):
        from trainers.losses.detection import DetectionLoss
        return DetectionLoss(self)
