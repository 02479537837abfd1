"""The one rule for credentials inside URLs, shared by checkpoints (trainers/) and the MLflow
redaction (callbacks/), so both hide the same thing."""
from __future__ import annotations

import re

# User info: after ``scheme://``, either a ``name:`` and everything up to the token's last '@' (a
# password may hold '@' or '/'), or a token without '/' before an '@' (``https://token@host``).
# A path holding '@' stays (``s3://bucket/team@v2``: checkpoints keep storage paths usable), unless
# the host has a port (``http://host:80/a@b``): masked, as hiding too much beats leaking.
URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?:[^/\s@]*:\S*|[^/\s]*)@")


def mask_url_userinfo(text: str, mask: str = "***") -> str:
    """``text`` with the user info of every URL replaced by ``mask``; with ``mask=""`` it is dropped
    (``http://host``), which keeps a URI usable with credentials given another way (env vars)."""
    return URL_USERINFO.sub(lambda m: m["scheme"] + (f"{mask}@" if mask else ""), text)
