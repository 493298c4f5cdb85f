"""`quill serve MODEL --replicas N`: start a local Ray instance (or join a cluster), start Ray
Serve's HTTP proxy on the usual host and port, deploy the application and serve until SIGINT or
SIGTERM. Then the application is deleted, which Ray Serve does gracefully: the ingress stops
admitting and gives requests in flight the server's shutdown grace, the replicas finish theirs
within their graceful timeout, and only then are the processes stopped. A local Ray instance
started here is stopped with it; a cluster joined with --ray-address keeps running."""
from __future__ import annotations

import logging
import signal
import threading

import ray
from ray import serve

from quill.deploy.application import build_app
from quill.deploy.settings import ClusterSettings

log = logging.getLogger("quill.deploy")

APP_NAME = "quill"


def serve_cluster(settings: ClusterSettings, *, host: str, port: int, ray_address: str | None = None) -> None:
    local = ray_address is None
    ray.init(address=ray_address, include_dashboard=False if local else None, logging_level=logging.WARNING)
    try:
        settings.check_fits(ray.cluster_resources())
        serve.start(http_options={"host": host, "port": port})
    except BaseException:
        ray.shutdown()
        raise
    stop = _stop_on_signals()  # after ray.init, which installs a SIGTERM handler that exits at once
    try:
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/")  # returns once every replica is up
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
