"""Quill on Ray Serve: N engine replicas behind one OpenAI-compatible ingress (`quill serve MODEL
--replicas N`, or `serve run` / `serve deploy` with a config file whose `import_path` is
`quill.deploy:app`; see examples/ray-serve.yaml). Needs the `cluster` extra (`pip install
quill[cluster]`, i.e. `ray[serve]`); nothing outside this package imports Ray.

  settings     ClusterSettings: the model, the server's config, replicas, threads, routing, timings
  application  the two deployments, bound (`build_app`), and `app` for config files
  ingress      the ordinary server app (quill/server) with a ReplicaClient as its engine
  client       ReplicaClient: the engine interface over a Ray Serve handle; failover and timeouts
  router       Ray Serve's request router, asking affinity.py for each request's candidates
  affinity     prefix-affinity routing by KV-block hashes (plain Python)
  replica      EngineReplica: one engine on its AsyncEngine, streaming deltas (wire.py)
  board, stats the replicas' engine stats: published, read, summed
  launch       `quill serve --replicas`: a local Ray instance (or a cluster's), until a signal
"""
from __future__ import annotations

from typing import Any


def app(args: dict[str, Any]):
    """Ray Serve's application builder (`import_path: quill.deploy:app`); `args` are the fields
    of `quill.deploy.settings.ClusterSettings`. Ray is imported only when it is called."""
    from quill.deploy.application import app as build

    return build(args)
