"""One S3 set-up for boto3, pyarrow and Ray's storage: the config keys, then the standard AWS chain.

``s3_endpoint``, ``s3_region`` and ``s3_profile`` (``trainers/default.yaml``) are filled from the
standard variables when not given (``trainers.config.ENV_VARS``) and travel with a run's args, so
the driver, the callback actor and the Ray workers reach the same store. What is still None is left
to boto3's own chain (``~/.aws/config``, credentials, an instance role). pyarrow's S3FileSystem
(the event log's reader, Ray Train's and Tune's checkpoints) is built from what boto3 resolved, so
both reach the same endpoint, region and account. Keys are never part of the set-up: they come
from each process's environment, a profile or a role, and so never reach MLflow.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from urllib.parse import urlparse

from trainers.utils import UserError

CONFIG_KEYS = {"endpoint": "s3_endpoint", "region": "s3_region", "profile": "s3_profile"}


def is_aws(endpoint: str | None) -> bool:
    """Whether boto3's endpoint is AWS itself (not MinIO, Ceph or moto)."""
    return not endpoint or (urlparse(endpoint).hostname or "").endswith(".amazonaws.com")


@dataclass(frozen=True)
class S3Setup:
    """Endpoint URL, region and profile name (None: boto3's chain decides); plain data, so it pickles."""

    endpoint: str | None = None
    region: str | None = None
    profile: str | None = None

    def __post_init__(self):
        if self.endpoint and urlparse(self.endpoint).scheme not in ("http", "https"):
            raise UserError(f"config key 's3_endpoint': {self.endpoint!r} is not an http:// or https:// URL")

    @classmethod
    def of(cls, args) -> "S3Setup":
        """The set-up a run's config names (``args`` or a dict with the ``s3_*`` keys)."""
        return cls(**{field: args.get(key) for field, key in CONFIG_KEYS.items()})

    def as_config(self) -> dict:
        """The ``s3_*`` config keys of this set-up."""
        return {CONFIG_KEYS[field]: value for field, value in asdict(self).items()}

    def session(self):
        import boto3
        from botocore.exceptions import ProfileNotFound
        try:
            return boto3.Session(profile_name=self.profile, region_name=self.region)
        except ProfileNotFound:
            raise UserError(f"config key 's3_profile': AWS profile {self.profile!r} is not in "
                            f"~/.aws/config or ~/.aws/credentials") from None

    def client(self, session=None):
        """boto3's S3 client: standard retries, a short connect timeout. S3-compatible servers get
        path-style addressing and checksums only where required: MinIO, Ceph and moto differ from AWS
        on the checksums newer boto3 sends by default."""
        from botocore.config import Config
        session = session or self.session()
        options = dict(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5,
                       read_timeout=60, max_pool_connections=16)
        probe = session.client("s3", endpoint_url=self.endpoint, config=Config(**options))
        if is_aws(probe.meta.endpoint_url):
            return probe
        return session.client("s3", endpoint_url=self.endpoint, config=Config(**options, **compatible_options()))

    def arrow_fs(self, client=None, session=None):
        """A pyarrow S3FileSystem reaching what boto3's ``client`` reaches (endpoint, region)."""
        import pyarrow.fs as pafs
        session = session or self.session()
        client = client or self.client(session)
        kwargs = dict(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
                      **self._arrow_credentials(session))
        if session.region_name:  # set or configured; else pyarrow's own default, as boto3 has its own
            kwargs["region"] = client.meta.region_name
        if not is_aws(client.meta.endpoint_url):
            url = urlparse(client.meta.endpoint_url)
            kwargs.update(endpoint_override=url.netloc, scheme=url.scheme)
        return pafs.S3FileSystem(**kwargs)

    def _arrow_credentials(self, session) -> dict:
        """A named profile's keys (pyarrow cannot read profiles), resolved once by boto3. Otherwise
        pyarrow's AWS SDK takes the same environment, files and roles as boto3 and refreshes
        temporary keys itself: Ray's storage filesystem lives as long as the run."""
        creds = session.get_credentials() if self.profile else None
        if creds is None:
            return {}
        frozen = creds.get_frozen_credentials()
        return dict(access_key=frozen.access_key, secret_key=frozen.secret_key, session_token=frozen.token)


def compatible_options() -> dict:
    """botocore options for S3-compatible servers, unless the standard variables say otherwise."""
    out = {"s3": {"addressing_style": os.environ.get("AWS_S3_ADDRESSING_STYLE", "path")}}
    for key in ("request_checksum_calculation", "response_checksum_validation"):
        if f"AWS_{key.upper()}" not in os.environ:
            out[key] = "when_required"
    return out
