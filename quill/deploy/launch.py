"""`quill serve MODEL --replicas N`: start a local Ray instance (or join a cluster), start Ray
Serve's HTTP proxy on the usual host and port, deploy the application and serve until SIGINT or
SIGTERM. Then the application is deleted, which Ray Serve does gracefully: the ingress stops
admitting and gives requests in flight the server's shutdown grace, the replicas finish theirs
within their graceful timeout, and only then are the processes stopped. A local Ray instance
started here is stopped with it; a cluster joined with --ray-address keeps running.

With a local instance the model is found (or pulled) here first: a typo fails at once rather than
after Ray has retried every replica, and the replicas load the one local file instead of each
pulling it. A cluster's nodes may see other paths, so there the replicas resolve it themselves."""
from __future__ import annotations

import logging
import signal
import threading

import ray
from ray import serve

from quill.deploy.application import ENGINE_DEPLOYMENT, build_app
from quill.deploy.settings import ClusterSettings
from quill.errors import QuillError
from quill.weights.hub import resolve_model

log = logging.getLogger("quill.deploy")

APP_NAME = "quill"


class DeploymentStartError(QuillError):
    """The replicas could not be started (the model failed to load in them, for instance)."""


def serve_cluster(settings: ClusterSettings, *, host: str, port: int, ray_address: str | None = None) -> None:
    local = ray_address is None
    if local:
        settings = settings.model_copy(update={"model": str(resolve_model(settings.model))})
    ray.init(address=ray_address, include_dashboard=False if local else None, logging_level=logging.WARNING)
    try:
        settings.check_fits(ray.cluster_resources())
        serve.start(http_options={"host": host, "port": port})
    except BaseException:
        ray.shutdown()
        raise
    stop = _stop_on_signals()  # after ray.init, which installs a SIGTERM handler that exits at once
    try:
        _run(settings)
        shown = f"[{host}]" if ":" in host else host
        log.info("serving %s from %s replicas on http://%s:%d/v1 (Ray Serve)", settings.model,
                 f"{settings.autoscaling.min_replicas}-{settings.autoscaling.max_replicas}" if settings.autoscaling
                 else settings.replicas, shown, port)
        while not stop.wait(1.0):
            pass
    finally:
        log.info("shutting down: draining requests in flight")
        serve.delete(APP_NAME)  # graceful: see the module's docstring
        if local:
            serve.shutdown()
        ray.shutdown()


def _run(settings: ClusterSettings) -> None:
    """Deploy the application; return once every replica is up."""
    try:
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    except RuntimeError as exc:  # Ray Serve gave up on the deployment: say why, without Ray's traceback
        status = serve.status().applications.get(APP_NAME)
        engine = status.deployments.get(ENGINE_DEPLOYMENT) if status is not None else None
        reason = engine.message if engine is not None and engine.message else str(exc)
        raise DeploymentStartError(f"the replicas did not start: {reason.strip()}") from None


def _stop_on_signals() -> threading.Event:
    """SIGINT or SIGTERM sets the event (a deployment still starting finishes first, then stops);
    a second one interrupts at once, and the application is deleted all the same."""
    stop = threading.Event()

    def handler(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log.info("stopping (once the deployment is up, if it is still starting; again to stop at once)")

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return stop
