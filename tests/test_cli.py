"""The command line: help, and one clear line (exit 2, no traceback) for each bad input."""
import subprocess
import sys

import pytest

from tests.helpers import own_lines
from tests.servers import mlflow_store


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_help_lists_modes_and_keys():
    out = run_cli("--help")
    assert out.returncode == 0
    for word in ("train", "val", "predict", "export", "epochs", "clip_grad", "fitness_weights"):
        assert word in out.stdout


@pytest.mark.parametrize("mode", ["train", "val", "predict", "export"])
def test_mode_help_shows_help(mode):
    out = run_cli(mode, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: orchestrator MODE") and "epochs" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "epoch=3"], "unknown config key 'epoch'; did you mean 'epochs'?"),
    (["train", "epochs=abc"], "config key 'epochs': value 'abc' is not valid (expected int)"),
    (["train", "optimizer=Adamm"], "config key 'optimizer': value 'Adamm' is not one of"),
    (["train", "log_every_n_steps=0"], "config key 'log_every_n_steps': value 0 is not valid (expected an int >= 1)"),
    (["train", "model=cls-n.yaml", "data=missing_dir"], "dataset 'missing_dir' not found"),
    (["train", "model=cls-n.yaml", "data=."], "dataset folder . needs train/ and val/ subfolders"),
    (["train", "cfg=missing.yaml"], "config file missing.yaml does not exist"),
    (["train", "model=nope.yaml"], "nope.yaml"),
    (["train", "data=digits"], "data=digits is a classification data set (digits, or a folder of class folders), "
                               "not a detection data YAML: give a data YAML, or a classification model"),  # det-n
    (["train", "model=cls-n.yaml", "data=shapes8.yaml"], "data=shapes8.yaml is a detection data YAML, not a "
                                                         "classification data set"),
    (["val", "model=missing.pt"], "checkpoint missing.pt does not exist"),
    (["predict", "model=cls-n.yaml"], "config key 'source' is required for predict"),
    (["predict", "model=cls-n.yaml", "source=http://host/x.png"], "source http://host/x.png does not exist (URLs "
                                                                    "are not read: download the image first)"),
    (["nomode"], "unknown mode 'nomode'"),
    (["recover", "journal=nope"], "recover: journal folder nope does not exist"),
])
def test_bad_input_gets_one_line(tmp_path, args, message):
    out = run_cli(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_cfg_file_that_is_not_text_gets_one_line(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(bytes(range(128, 256)))
    out = run_cli("train", "cfg=binary.yaml", cwd=tmp_path)
    assert (out.returncode, out.stderr) == (2, "error: config file binary.yaml is not valid YAML (not UTF-8 text)\n")


def tiny_train(tmp_path, *extra) -> list[str]:
    return ["train", "model=cls-n.yaml", "data=digits", "epochs=2", "imgsz=16", "fraction=0.05", "batch=16",
            "nbs=16", "plots=False", f"project={tmp_path / 'runs'}", f"tracking_uri={mlflow_store(tmp_path / 'm.db')}",
            f"storage={tmp_path / 'store'}", f"journal={tmp_path / 'journal'}", *extra]


def test_train_prints_a_header_one_line_per_epoch_and_the_result(tmp_path, capsys):
    from orchestrator.cli import main

    assert main(tiny_train(tmp_path)) == 0
    out = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(out) if line.split()[:1] == ["epoch"])
    assert out[head].split() == ["epoch", "loss", "top1", "top5", "time", "ETA"]
    assert [line.split()[0] for line in out[head + 1:head + 4]] == ["1/2", "2/2", "best.pt"]
    assert out[head + 4] == "results:"
    folder = tmp_path / "runs" / "train"
    assert out[-4:] == [f"run folder: {folder}  (results.csv, results.png, args.yaml)",
                        f"checkpoints: {folder / 'weights'}  (best.pt, last.pt)",
                        f"MLflow store: sqlite:///{tmp_path}/m.db   (open the UI: orchestrator ui)",
                        f"object store: {tmp_path / 'store'}  (event log, checkpoints)"]
    assert (folder / "results.csv").is_file()


def test_train_with_verbose_false_prints_only_the_result(tmp_path, capsys):
    from orchestrator.cli import main

    assert main(tiny_train(tmp_path, "verbose=False")) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == "results:" and own_lines(captured.err) == []


def test_export_names_its_file_once(tmp_path, capsys, monkeypatch):
    from orchestrator.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["export", "model=cls-n.yaml", "imgsz=16"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "exported: runs/export/model.torchscript\n"
    assert "model.torchscript" not in captured.err and (tmp_path / "runs/export/model.torchscript").is_file()


def test_predict_says_where_it_saved_the_images_in_a_new_folder_each_time(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from orchestrator.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    for i in range(2):
        Image.new("L", (16, 16), i * 100).save(tmp_path / "images" / f"{i}.png")
    for folder in ("predict", "predict2"):  # numbered as training runs are
        assert main(["predict", "model=cls-n.yaml", "source=images", "imgsz=16"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[-1] == f"2 image(s) predicted; annotated images in runs/classify/{folder}"
        assert sorted(p.name for p in (tmp_path / "runs" / "classify" / folder).iterdir()) == ["0.png", "1.png"]
    assert main(["predict", "model=cls-n.yaml", "source=images", "imgsz=16", "save=False"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 image(s) predicted"
    assert sorted(p.name for p in (tmp_path / "runs" / "classify").iterdir()) == ["predict", "predict2"]
