"""``register=``: a finished run's best.pt (its logged model) becomes a model version carrying its
metrics; the pyfunc flavor gives a classifier's class scores."""
import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from orchestrator import Model
from tests.helpers import tracking
from tests.servers import mlflow_store


def test_a_model_mlflow_did_not_take_at_the_end_is_published_by_recover(tmp_path):
    """The run's records reached MLflow, but its artifact store refused the model's files (a file
    stands where the models' folder goes): the run finishes with its model kept in the journal;
    ``orchestrator recover`` completes the model MLflow made (no second one) and registers it once
    the store takes files again (a version with the run's metrics, whose pyfunc gives the class
    scores), and a second ``recover`` finds nothing left. A registration without a fault: tests/test_lineage.py."""
    from tests.test_journal import orchestrator, recover_publishes

    uri = mlflow_store(tmp_path / "mlflow.db")
    blocker = tmp_path / "mlartifacts" / "digits" / "models"  # the experiment's models' folder

    def block_models(trainer):
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("not a folder")

    model = Model("cls-n.yaml")
    model.add_callback("on_train_end", block_models)
    metrics = model.train(data="digits", epochs=1, imgsz=16, fraction=0.05, verbose=False, plots=False,
                          project=str(tmp_path / "digits"), name="reg", tracking_uri=uri, storage=str(tmp_path / "store"),
                          journal=str(tmp_path / "journal"), register="digits-classifier")
    client = MlflowClient(uri)
    assert model.mlflow_model_id is None and client.search_model_versions("name='digits-classifier'") == []
    (folder,) = (tmp_path / "journal").iterdir()
    assert (folder / "publish.json").is_file()
    experiment = client.get_experiment_by_name("digits").experiment_id
    (refused,) = client.search_logged_models([experiment])  # made, its files refused
    assert str(refused.status) == "FAILED"

    blocker.unlink()
    model_id = recover_publishes(folder, tmp_path)
    (version,) = client.search_model_versions("name='digits-classifier'")
    assert version.source == f"models:/{model_id}" and version.run_id == client.get_logged_model(model_id).source_run_id
    assert abs(float(version.tags["metrics/accuracy_top1"]) - metrics["metrics/accuracy_top1"]) < 1e-5
    assert metrics.top1 == metrics["metrics/accuracy_top1"] and metrics.fitness == metrics["fitness"]  # SPEC §6
    assert "weights/best.pt" in [a.path for a in client.list_artifacts(version.run_id, "weights")]
    assert client.get_run(version.run_id).info.status == "FINISHED"
    models = client.search_logged_models([experiment])  # every status, counted raw
    assert [(m.model_id, str(m.status)) for m in models] == [(refused.model_id, "READY")]  # completed, not made again
    assert [o.model_id for o in client.get_run(version.run_id).outputs.model_outputs] == [model_id]
    images = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)
    with tracking(uri):
        scores = mlflow.pyfunc.load_model("models:/digits-classifier/1").predict(images)
    expected = torch.stack([r.probs.data for r in model.predict(list(images))]).numpy()
    assert scores.shape == (3, 10) and np.allclose(scores, expected, atol=1e-6)
    assert not (folder / "publish.json").exists()
    again = orchestrator(["recover", f"journal={tmp_path / 'journal'}"], tmp_path)
    assert again.returncode == 0 and again.stdout.startswith("nothing to recover")
