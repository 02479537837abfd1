"""The MLflow model flavor of a trained checkpoint: one logged model, loadable two ways.

``mlflow.pytorch.load_model(uri)`` gives the ``nn.Module`` (the pytorch flavor, saved by MLflow);
``mlflow.pyfunc.load_model(uri).predict(images)`` runs the task's own predictor on it, so a served
model letterboxes, runs NMS and maps boxes back exactly as ``Model(best.pt).predict`` does. Images
go in as one ``(N, H, W, 3)`` uint8 array (or a list of ``(H, W, 3)`` arrays); a detection model
gives a table of boxes in the input images' pixels, a classification model an ``(N, classes)`` array
of scores. ``model_config`` (at logging or at ``load_model``) sets ``conf``, ``iou``, ``max_det``,
``imgsz`` and ``device``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from orchestrator.tasks import task_class
from trainers.config import get_cfg

BOX_COLUMNS = ("image", "x1", "y1", "x2", "y2", "confidence", "class_id", "class_name")
CONFIG_KEYS = ("task", "imgsz", "conf", "iou", "max_det", "device")


def model_config(args) -> dict:
    """The prediction settings of the trained run (MLflow accepts at load only keys logged here)."""
    return {"task": args.task, "imgsz": args.imgsz, "conf": args.conf, "iou": args.iou,
            "max_det": args.max_det, "device": None}


def save_model(path, mlflow_model, pytorch_model, model_config: dict, **pytorch_kwargs) -> None:
    """Called by ``mlflow.models.Model.log``: MLflow's pytorch flavor, then this module as the
    pyfunc loader in place of MLflow's tensor-in tensor-out one."""
    import mlflow.pyfunc
    import mlflow.pytorch

    mlflow.pytorch.save_model(pytorch_model, path, mlflow_model=mlflow_model, **pytorch_kwargs)
    data = mlflow_model.flavors["python_function"]["data"]
    mlflow.pyfunc.add_to_model(mlflow_model, loader_module=__name__, data=data, conda_env="conda.yaml",
                               python_env="python_env.yaml", model_config=model_config)
    mlflow_model.save(str(Path(path) / "MLmodel"))


def _load_pyfunc(data_path: str, model_config: dict | None = None):
    """MLflow's pyfunc entry point: the module from the pytorch flavor beside ``data_path``."""
    import mlflow.pytorch

    return ImageModel(mlflow.pytorch.load_model(str(Path(data_path).parent)), model_config or {})


class ImageModel:
    """The pyfunc model: images in; boxes (detect) or class scores (classify) out."""

    def __init__(self, module, config: dict):
        self.config = {k: v for k, v in config.items() if k in CONFIG_KEYS and v is not None}
        self.module = module.to(self.config.get("device") or "cpu").eval()

    def predict(self, model_input, params: dict | None = None):
        predictor = self._predictor({**self.config, **(params or {})})
        results = predictor(source=_image_list(model_input), model=self.module)
        return _scores(results) if self.config["task"] == "classify" else _boxes(results)

    def _predictor(self, config: dict):
        args = get_cfg(None, {**config, "mode": "predict", "save": False, "verbose": False})
        return task_class(config["task"], "predictor")(args=args)


def _image_list(model_input) -> list[np.ndarray]:
    """One array of images, or a list of them (MLflow hands a list through as it is)."""
    if isinstance(model_input, np.ndarray) and model_input.ndim == 3:
        return [model_input]
    return [np.asarray(im) for im in model_input]


def _boxes(results):
    """One row per box, ``image`` the input's index, boxes in the input image's pixels."""
    import pandas as pd

    rows = [(i, *map(float, box[:5]), int(box[5]), r.names.get(int(box[5]), str(int(box[5]))))
            for i, r in enumerate(results) for box in r.boxes.data.tolist()]
    return pd.DataFrame(rows, columns=list(BOX_COLUMNS))


def _scores(results) -> np.ndarray:
    return np.stack([r.probs.data.numpy() for r in results])
