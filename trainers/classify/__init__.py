"""Image classification task."""
from trainers.classify.predict import ClassificationPredictor
from trainers.classify.train import ClassificationTrainer
from trainers.classify.val import ClassificationValidator
from trainers.models.tasks import ClassificationModel

__all__ = ["ClassificationTrainer", "ClassificationValidator", "ClassificationPredictor", "ClassificationModel"]
