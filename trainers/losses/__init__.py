"""Task losses: ``DetectionLoss`` (box + class + DFL) and ``ClassificationLoss``."""
from .classify import ClassificationLoss
from .detection import DetectionLoss

__all__ = ["ClassificationLoss", "DetectionLoss"]
