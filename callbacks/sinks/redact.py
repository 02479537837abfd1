"""Keep secrets out of MLflow params, tags, artifacts and log lines.

A value is secret when its key is named like one (key, secret, token, password, credential),
when it looks like an AWS access key id, when it is the user info of a URL (``user:password@``,
``token@``; the rule is ``trainers.utils.urls``), or when
it contains the value of an environment variable whose name looks secret. Redaction replaces
the secret part with ``***``; it never raises.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Iterable

from trainers.utils.urls import mask_url_userinfo

MASK = "***"
SECRET_WORDS = frozenset({
    "key", "keys", "apikey", "secret", "secrets", "token", "password", "passwd", "pwd",
    "passphrase", "credential", "credentials", "auth", "authorization", "cookie", "privatekey",
})
MIN_SECRET_LEN = 8      # env values shorter than this are too common to mask everywhere
MIN_KNOWN_LEN = 6       # values found under secret-named config keys
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AROA|AIDA)[A-Z0-9]{16}\b")
_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")


def key_looks_secret(name: str) -> bool:
    """True when any word of ``name`` (split on punctuation and camelCase) is a secret word."""
    words = [w.lower() for w in _WORD_SPLIT.split(str(name)) if w]
    return any(w in SECRET_WORDS for w in words)


# Named like secrets ("pwd") but they are working directories, not passwords.
NOT_SECRET_ENV = frozenset({"PWD", "OLDPWD"})


def env_secrets(environ: dict | None = None) -> list[str]:
    """Values of environment variables named like secrets, longest first (long enough to match)."""
    environ = os.environ if environ is None else environ
    found = {v for k, v in environ.items()
             if k not in NOT_SECRET_ENV and key_looks_secret(k) and len(v) >= MIN_SECRET_LEN}
    return sorted(found, key=len, reverse=True)


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask AWS key ids, URL passwords and every known secret value inside ``text``."""
    if not text:
        return text
    for value in sorted({*secrets, *env_secrets()}, key=len, reverse=True):
        if value and len(value) >= MIN_KNOWN_LEN and value in text:
            text = text.replace(value, MASK)
    text = _AWS_KEY_ID.sub(MASK, text)
    return mask_url_userinfo(text, MASK)


def redact_value(key: str, value: Any, secrets: Iterable[str] = ()) -> Any:
    """``***`` for a secret-named key, else the value with secret parts masked."""
    if key_looks_secret(key) and isinstance(value, (str, int, float)) and not isinstance(value, bool) \
            and value != "":
        return MASK
    if isinstance(value, str):
        return redact_text(value, secrets)
    return value


def flatten(cfg: dict, prefix: str = "", sep: str = ".") -> dict:
    """Nested dicts become one level with keys joined by ``sep`` (``{"a": {"b": 1}} -> {"a.b": 1}``)."""
    flat: dict = {}
    for key, value in cfg.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


def secret_values(flat: dict) -> set[str]:
    """String values stored under secret-named keys: these are masked wherever else they appear."""
    return {str(v) for k, v in flat.items()
            if key_looks_secret(k) and isinstance(v, (str, int)) and not isinstance(v, bool)
            and len(str(v)) >= MIN_KNOWN_LEN}


def redact_params(flat: dict, secrets: Iterable[str] = ()) -> dict:
    """Redact a flat param dict: secret-named keys, AWS ids, URL passwords, env secret values."""
    known = {*secrets, *secret_values(flat)}
    return {k: redact_value(k, v, known) for k, v in flat.items()}


def redact_mapping(obj: Any, secrets: Iterable[str] = (), key: str = "") -> Any:
    """Recursive redaction of a config-like object (dicts, lists, strings) keeping its shape."""
    if isinstance(obj, dict):
        return {k: redact_mapping(v, secrets, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_mapping(v, secrets, key) for v in obj)
    if type(obj).__name__.endswith("Namespace") and isinstance(getattr(obj, "__dict__", None), dict):
        return {k: redact_mapping(v, secrets, k) for k, v in vars(obj).items()}
    return redact_value(key, obj, secrets)


class SecretFilter(logging.Filter):
    """Masks known secret values (env vars named like secrets, plus ``extra``) in log records."""

    def __init__(self, extra: Iterable[str] = ()):
        super().__init__()
        self.extra = set(extra)

    def add(self, values: Iterable[str]) -> None:
        self.extra.update(v for v in values if v)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        clean = redact_text(message, self.extra)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install_log_filter(logger: logging.Logger, extra: Iterable[str] = ()) -> SecretFilter:
    """Attach (once) a SecretFilter to ``logger`` and its handlers; returns it to add values later."""
    for flt in logger.filters:
        if isinstance(flt, SecretFilter):
            flt.add(extra)
            return flt
    flt = SecretFilter(extra)
    logger.addFilter(flt)
    for handler in logger.handlers:
        handler.addFilter(flt)
    return flt


TEXT_SUFFIXES = {".yaml", ".yml", ".json", ".txt", ".csv", ".log", ".md", ".cfg", ".ini", ".toml"}
TORCH_SUFFIXES = {".pt", ".pth"}


class SecretInFile(ValueError):
    """A file still holds a secret value after redaction: it must not be uploaded."""


def redact_file(src, dst, secrets: Iterable[str] = ()) -> None:
    """Copy ``src`` to ``dst`` with secrets masked (text, YAML, torch checkpoints).

    Other binary files are copied as-is. Afterwards the copy is scanned for every known secret
    value; if one is still there, the copy is deleted and SecretInFile is raised.
    """
    from pathlib import Path
    src, dst = Path(src), Path(dst)
    known = {*secrets, *env_secrets()}
    suffix = src.suffix.lower()
    if suffix in (".yaml", ".yml"):
        _redact_yaml(src, dst, known)
    elif suffix in TEXT_SUFFIXES:
        dst.write_text(redact_text(src.read_text(errors="replace"), known))
    elif suffix in TORCH_SUFFIXES and file_contains(src, known):
        _redact_checkpoint(src, dst, known)  # parsing needs torch: only when a secret is in there
    else:
        import shutil
        shutil.copyfile(src, dst)
    if file_contains(dst, known):
        dst.unlink(missing_ok=True)
        raise SecretInFile(f"{src.name} holds a secret value that could not be masked; not uploaded")


def _redact_yaml(src, dst, known) -> None:
    import yaml
    try:
        data = yaml.safe_load(src.read_text())
    except yaml.YAMLError:
        dst.write_text(redact_text(src.read_text(errors="replace"), known))
        return
    dst.write_text(yaml.safe_dump(redact_mapping(data, known), sort_keys=False))


def _redact_checkpoint(src, dst, known) -> None:
    import shutil
    import torch
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except Exception:
        shutil.copyfile(src, dst)  # not a torch file: the final scan decides
        return
    if not isinstance(ckpt, dict):
        shutil.copyfile(src, dst)
        return
    clean = {k: (v if _is_tensorish(v) else redact_mapping(v, known, str(k))) for k, v in ckpt.items()}
    torch.save(clean, dst)


def _is_tensorish(value) -> bool:
    """State dicts and tensors are kept as they are (no strings worth masking inside)."""
    import torch
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, dict) and bool(value) and \
        all(isinstance(v, torch.Tensor) for v in value.values())


def file_contains(path, values: Iterable[str], block: int = 1 << 20) -> bool:
    """True when any of ``values`` (>= MIN_KNOWN_LEN chars) occurs in the file's bytes."""
    needles = [v.encode() for v in values if v and len(v) >= MIN_KNOWN_LEN]
    if not needles:
        return False
    overlap = max(len(n) for n in needles) - 1
    tail = b""
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            window = tail + chunk
            if any(n in window for n in needles):
                return True
            tail = window[-overlap:] if overlap else b""
    return False
