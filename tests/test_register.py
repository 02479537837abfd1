"""``register=``: a finished run's best.pt becomes a model version carrying its metrics."""
from mlflow.tracking import MlflowClient

from orchestrator import Model


def test_register_best_model_with_metrics(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model = Model("cls-n.yaml")
    metrics = model.train(data="digits", epochs=1, imgsz=16, fraction=0.05, verbose=False, plots=False,
                          project=str(tmp_path / "digits"), name="reg", tracking_uri=uri,
                          storage=str(tmp_path / "store"), register="digits-classifier")
    client = MlflowClient(uri)
    (version,) = client.search_model_versions("name='digits-classifier'")
    assert version.source.endswith("/weights")
    assert abs(float(version.tags["metrics/accuracy_top1"]) - metrics["metrics/accuracy_top1"]) < 1e-5
    assert metrics.top1 == metrics["metrics/accuracy_top1"] and metrics.fitness == metrics["fitness"]  # SPEC §6
    artifacts = [a.path for a in client.list_artifacts(version.run_id, "weights")]
    assert "weights/best.pt" in artifacts
    assert client.get_run(version.run_id).info.status == "FINISHED"
