"""Folder-per-class data, prediction on a folder, ONNX export equal to eager."""
import warnings

import numpy as np
import torch
from PIL import Image

from orchestrator import Model
from trainers.data.sources import read_image


def make_folder_dataset(root, per_class=16):
    """Two visually distinct classes: bright squares vs dark images."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name, level in (("bright", 220), ("dark", 30)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                img = np.clip(rng.normal(level, 10, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def test_folder_per_class_trains_and_predicts_a_folder(tmp_path):
    data = make_folder_dataset(tmp_path / "ds")
    with warnings.catch_warnings():  # reading the folder warns the user of nothing
        warnings.simplefilter("error")
        torch.from_numpy(read_image(next((data / "train" / "dark").iterdir())))
    model = Model("cls-n.yaml")
    metrics = model.train(data=str(data), epochs=8, imgsz=16, batch=4, nbs=4, verbose=False, plots=False,
                          optimizer="AdamW", lr0=0.003, warmup_epochs=0, project=str(tmp_path), name="folder")
    assert model.model.names == {0: "bright", 1: "dark"}
    assert metrics["metrics/accuracy_top1"] == 1.0, metrics
    results = list(model.predict(source=str(data / "val" / "dark"), stream=True))
    assert len(results) == 16 and all(r.probs.top1 == 1 for r in results)
    assert results[0].plot().shape == (20, 20, 3)


def test_onnx_export_matches_eager(tmp_path):
    import onnxruntime as ort

    model = Model("cls-n.yaml")
    model.train(data="digits", epochs=1, imgsz=16, fraction=0.05, verbose=False, plots=False,
                project=str(tmp_path), name="onnx")
    path = model.export(format="onnx", imgsz=16)
    x = torch.rand(1, 1, 16, 16)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        eager = model.model.eval()(x).numpy()
    assert np.allclose(onnx_out, eager, atol=1e-4)
