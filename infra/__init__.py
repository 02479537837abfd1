"""Deployment helpers: the local stack (``infra.local``) and cluster manifests (``infra/cluster``)."""
