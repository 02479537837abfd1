"""Object detection task: trainer, validator and predictor on YOLO-layout data."""
from trainers.detect.predict import DetectionPredictor
from trainers.detect.train import DetectionTrainer
from trainers.detect.val import DetectionValidator
from trainers.losses.detection import DetectionLoss
from trainers.models.tasks import DetectionModel

__all__ = ["DetectionTrainer", "DetectionValidator", "DetectionPredictor", "DetectionModel", "DetectionLoss"]
