"""``register=``: a finished run's best.pt (its logged model) becomes a model version carrying its
metrics; the pyfunc flavor gives a classifier's class scores."""
import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from orchestrator import Model
from tests.helpers import tracking


def test_register_best_model_with_metrics(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model = Model("cls-n.yaml")
    metrics = model.train(data="digits", epochs=1, imgsz=16, fraction=0.05, verbose=False, plots=False,
                          project=str(tmp_path / "digits"), name="reg", tracking_uri=uri,
                          storage=str(tmp_path / "store"), register="digits-classifier")
    client = MlflowClient(uri)
    (version,) = client.search_model_versions("name='digits-classifier'")
    assert version.source == f"models:/{model.mlflow_model_id}"
    assert abs(float(version.tags["metrics/accuracy_top1"]) - metrics["metrics/accuracy_top1"]) < 1e-5
    assert metrics.top1 == metrics["metrics/accuracy_top1"] and metrics.fitness == metrics["fitness"]  # SPEC §6
    artifacts = [a.path for a in client.list_artifacts(version.run_id, "weights")]
    assert "weights/best.pt" in artifacts
    assert client.get_run(version.run_id).info.status == "FINISHED"
    images = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)
    with tracking(uri):
        scores = mlflow.pyfunc.load_model("models:/digits-classifier/1").predict(images)
    expected = torch.stack([r.probs.data for r in model.predict(list(images))]).numpy()
    assert scores.shape == (3, 10) and np.allclose(scores, expected, atol=1e-6)
