"""A local stack on 127.0.0.1 for trying the cluster setup on one machine:
moto S3, an ``mlflow server`` with its artifacts on disk, and a token-protected Ray head.
See ``infra.local.stack`` (``orchestrator stack up|down|status|env``).
"""
