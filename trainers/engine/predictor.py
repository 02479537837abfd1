"""BasePredictor: lazily streams results for a source, firing the predictor events."""
from __future__ import annotations

from pathlib import Path

import torch

from trainers.registry import CallbackMixin, new_registry
from trainers.config import get_cfg
from trainers.data.sources import iter_batches
from trainers.engine.paths import run_dir
from trainers.utils import unwrap_model


class BasePredictor(CallbackMixin):
    """Tasks implement ``preprocess(images)`` and ``postprocess(preds, x, images, paths)``."""

    def __init__(self, args=None, _callbacks=None):
        self.args = args if args is not None else get_cfg(None, {"mode": "predict", "save": False})
        self.callbacks = _callbacks if _callbacks is not None else new_registry()
        self.model = None
        self.device = None
        self.batch = None
        self.results = None
        self.seen = 0
        self.save_dir = run_dir(self.args, "predict")

    def __call__(self, source=None, model=None, stream: bool = False):
        gen = self.stream_inference(source, model)
        return gen if stream else list(gen)

    @torch.no_grad()
    def stream_inference(self, source=None, model=None):
        self.setup_model(model)
        self.run_callbacks("on_predict_start")
        for self.batch in iter_batches(source if source is not None else self.args.source, self.args.batch):
            self.run_callbacks("on_predict_batch_start")
            paths, images = self.batch[0], self.batch[1]
            x = self.preprocess(images)
            results = self.postprocess(self.model(x), x, images, paths)
            self.results = results
            self.run_callbacks("on_predict_postprocess_end")
            if self.args.save:
                self.save_results(results)
            self.run_callbacks("on_predict_batch_end")
            self.seen += len(images)
            yield from self.results
        self.run_callbacks("on_predict_end")

    def setup_model(self, model) -> None:
        if model is not None:
            self.model = unwrap_model(model).eval()
        self.device = next(self.model.parameters()).device

    def save_results(self, results) -> None:
        for r in results:
            r.save(self.save_dir / f"{Path(r.path).stem}.png")

    def preprocess(self, images):
        raise NotImplementedError

    def postprocess(self, preds, x, images, paths):
        raise NotImplementedError

    def record_fields(self, event: str) -> dict:
        return {"epoch": 0, "step": self.seen, "metrics": {}, "artifacts": {}, "final_eval": False}
