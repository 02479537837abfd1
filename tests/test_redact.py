"""Redaction of params, text, files and log lines (the end-to-end check against a real MLflow
server is in test_sinks_mlflow.py)."""
from __future__ import annotations

import logging

import torch
import yaml

from callbacks.sinks.redact import (MASK, SecretFilter, SecretInFile, env_secrets, flatten,
                                    install_log_filter, key_looks_secret, redact_file, redact_params,
                                    redact_text)

AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY99"


def test_flatten_joins_nested_keys():
    assert flatten({"a": {"b": {"c": 1}, "d": [1, 2]}, "e": {}, "f": None}) == \
        {"a.b.c": 1, "a.d": [1, 2], "e": {}, "f": None}


def test_secret_key_names():
    for name in ("password", "db_password", "apiKey", "AWS_SECRET_ACCESS_KEY", "hf-token", "credentials",
                 "key", "MLFLOW_TRACKING_PASSWORD"):
        assert key_looks_secret(name), name
    for name in ("tokenizer", "max_tokens", "keypoints", "lr0", "monkey", "passes"):
        assert not key_looks_secret(name), name


def test_redact_params(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    url = "postgresql://bob:hunter2-x@db:5432/x"
    flat = flatten({"lr0": 0.01, "db": {"password": "hunter2-x", "url": url},
                    "access": "AKIAIOSFODNN7EXAMPLE", "blob": AWS_SECRET, "msg": f"key={AWS_SECRET};",
                    "tracking_uri": "http://127.0.0.1:5000", "token": "", "epochs": 3})
    out = redact_params(flat)
    assert out["lr0"] == 0.01 and out["epochs"] == 3 and out["tracking_uri"] == "http://127.0.0.1:5000"
    assert out["db.password"] == MASK and out["access"] == MASK and out["blob"] == MASK
    assert out["db.url"] == f"postgresql://{MASK}@db:5432/x"
    assert out["msg"] == f"key={MASK};"
    assert out["token"] == ""  # nothing to hide
    assert not [v for v in out.values() if isinstance(v, str) and ("hunter2" in v or AWS_SECRET in v)]


def test_env_secrets_only_from_secret_named_vars(monkeypatch):
    monkeypatch.setenv("MY_API_TOKEN", "tok-abcdefgh-123")
    monkeypatch.setenv("HOME_DIR_NAME", "tok-abcdefgh-456")
    monkeypatch.setenv("SHORT_SECRET", "abc")
    found = env_secrets()
    assert "tok-abcdefgh-123" in found and "tok-abcdefgh-456" not in found and "abc" not in found


def test_log_filter_masks_env_and_known_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    logger = logging.getLogger("test-redact-filter")
    logger.propagate = False
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(handler.format(record))
    logger.addHandler(handler)
    flt = install_log_filter(logger, ["hunter2-x"])
    assert install_log_filter(logger) is flt  # installed once
    logger.warning("creds %s and %s at %s", AWS_SECRET, "hunter2-x", "https://u:pw@host/p")
    logger.warning("AKIAIOSFODNN7EXAMPLE is an id")
    assert lines == [f"creds {MASK} and {MASK} at https://{MASK}@host/p", f"{MASK} is an id"]
    assert isinstance(flt, SecretFilter)


def test_redact_text_leaves_plain_text():
    assert redact_text("epoch 3/10 loss 0.25 s3://bucket/x") == "epoch 3/10 loss 0.25 s3://bucket/x"


def test_redact_yaml_and_checkpoint_files(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    args = {"epochs": 3, "password": "hunter2-x", "storage": {"url": "s3://b/p", "note": AWS_SECRET}}
    src = tmp_path / "args.yaml"
    src.write_text(yaml.safe_dump(args))
    redact_file(src, tmp_path / "out.yaml", {"hunter2-x"})
    out = yaml.safe_load((tmp_path / "out.yaml").read_text())
    assert out == {"epochs": 3, "password": MASK, "storage": {"url": "s3://b/p", "note": MASK}}

    ckpt = {"epoch": 1, "model": {"w": torch.ones(3)}, "args": args}
    torch.save(ckpt, tmp_path / "best.pt")
    redact_file(tmp_path / "best.pt", tmp_path / "clean.pt", {"hunter2-x"})
    clean = torch.load(tmp_path / "clean.pt", weights_only=True)
    assert clean["args"]["password"] == MASK and clean["args"]["storage"]["note"] == MASK
    assert torch.equal(clean["model"]["w"], torch.ones(3)) and clean["epoch"] == 1
    data = (tmp_path / "clean.pt").read_bytes()
    assert b"hunter2-x" not in data and AWS_SECRET.encode() not in data


def test_unmaskable_binary_is_withheld(tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(b"\x00\x01 hunter2-x \x02")
    try:
        redact_file(src, tmp_path / "copy.bin", {"hunter2-x"})
    except SecretInFile as exc:
        assert "blob.bin" in str(exc)
    else:
        raise AssertionError("a file holding a secret was let through")
    assert not (tmp_path / "copy.bin").exists()


URLS_WITH_USERINFO = [  # (URL, its secret part, what is left once masked)
    ("http://minio:p@ss-Word99@localhost:9000", "ss-Word99", "http://***@localhost:9000"),  # '@' in it
    ("http://alice:ab/cdPass99@127.0.0.1:9", "cdPass99", "http://***@127.0.0.1:9"),  # '/' in it
    ("https://ghp_TokenOnly1234567890@127.0.0.1:9", "ghp_TokenOnly", "https://***@127.0.0.1:9"),  # no ':'
]


def test_redact_text_masks_all_url_userinfo():
    for url, secret, masked in URLS_WITH_USERINFO:
        out = redact_text(f"error: cannot reach {url} (refused)")
        assert out == f"error: cannot reach {masked} (refused)" and secret not in out, out


def test_checkpoint_args_drop_all_url_userinfo():
    from trainers.config import get_cfg
    from trainers.engine.resume import args_without_credentials

    for url, _, masked in URLS_WITH_USERINFO:
        saved = args_without_credentials(get_cfg(overrides={"s3_endpoint": url}))
        assert saved["s3_endpoint"] == masked.replace("***@", ""), saved["s3_endpoint"]
    paths = {"storage": "s3://bucket/team@v2/runs", "tracking_uri": "sqlite:////srv/a@b/mlflow.db"}
    assert {k: args_without_credentials(get_cfg(overrides=paths))[k] for k in paths} == paths  # no user info


def test_ui_prints_no_tracking_password(monkeypatch):
    import os
    import subprocess
    import sys

    uri = "http://alice:S3cretPass99@mlflow.example.com"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for args, env in ((["tracking_uri=" + uri], {}), ([], {"MLFLOW_TRACKING_URI": uri})):
        out = subprocess.run([sys.executable, "-m", "orchestrator", "ui", *args], capture_output=True, text=True,
                             env={**os.environ, **env}, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "S3cretPass99" not in out.stdout + out.stderr
        assert "http://***@mlflow.example.com is an MLflow server" in out.stdout
