"""Spec-built models: layer blocks, the YAML parser and the task models."""
from .build import builtin_specs, load_spec, parse_model, resolve_spec, spec_task
from .tasks import BaseModel, ClassificationModel, DetectionModel

__all__ = ["BaseModel", "ClassificationModel", "DetectionModel", "builtin_specs", "load_spec",
           "parse_model", "resolve_spec", "spec_task"]
