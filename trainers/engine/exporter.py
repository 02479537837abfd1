"""Exporter: TorchScript (always) or ONNX (when the ``onnx`` package is installed)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from trainers.registry import CallbackMixin, new_registry
from trainers.config import get_cfg
from trainers.utils import LOGGER, UserError, unwrap_model


class Exporter(CallbackMixin):
    def __init__(self, args=None, _callbacks=None):
        self.args = args if args is not None else get_cfg(None, {"mode": "export"})
        self.callbacks = _callbacks if _callbacks is not None else new_registry()
        self.file = None
        self.model = None

    def __call__(self, model, stem: Path | None = None) -> str:
        """Export ``model``; files go next to ``stem`` (e.g. weights/best) or under runs/export."""
        self.run_callbacks("on_export_start")
        self.model = copy.deepcopy(unwrap_model(model)).eval().cpu()
        self.model.export = True
        stem = Path(stem) if stem else Path("runs/export") / "model"
        stem.parent.mkdir(parents=True, exist_ok=True)
        example = torch.zeros(1, self.model.yaml.get("ch", 3), self.args.imgsz, self.args.imgsz)
        export = {"torchscript": self.export_torchscript, "onnx": self.export_onnx}[self.args.format]
        self.file = export(example, stem)
        LOGGER.info(f"exported {self.args.format} to {self.file}")
        self.run_callbacks("on_export_end")
        return str(self.file)

    def export_torchscript(self, example, stem: Path) -> Path:
        file = stem.with_suffix(".torchscript")
        traced = torch.jit.trace(self.model, example, strict=False)
        traced.save(str(file))
        return file

    def export_onnx(self, example, stem: Path) -> Path:
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise UserError("format=onnx needs the onnx package: pip install onnx") from None
        file = stem.with_suffix(".onnx")
        torch.onnx.export(self.model, example, str(file), input_names=["images"], output_names=["output0"],
                          opset_version=17, dynamo=False)
        return file

    def record_fields(self, event: str) -> dict:
        artifacts = {"export": str(self.file)} if event == "on_export_end" and self.file else {}
        return {"epoch": 0, "step": 0, "metrics": {}, "artifacts": artifacts, "final_eval": False}
