"""`quill serve MODEL --replicas N`: start a local Ray instance (or join a cluster), deploy the
engine replicas on Ray Serve, and serve HTTP from this process (ingress.py's `local_ingress`, on
the usual host and port; no Ray HTTP proxy is started) until SIGINT or SIGTERM. Then the server
drains as `quill serve` does (it stops admitting and gives requests in flight the shutdown grace),
and the application is deleted, which lets the replicas finish anything left within their
graceful timeout. A local Ray instance started here is stopped with it; a cluster joined with
--ray-address keeps running.

With a local instance the model is found (or pulled) here first: a typo fails at once rather than
after Ray has retried every replica, and the replicas load the one local file instead of each
pulling it. A cluster's nodes may see other paths, so there the replicas resolve it themselves."""
from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading

import ray
from ray import serve

from quill.deploy.application import ENGINE_DEPLOYMENT, engine_app
from quill.deploy.ingress import local_ingress
from quill.deploy.settings import ClusterSettings
from quill.errors import QuillError
from quill.server.runner import serve as serve_http
from quill.weights.hub import resolve_model

log = logging.getLogger("quill.deploy")

APP_NAME = "quill"


class DeploymentStartError(QuillError):
    """The replicas could not be started (the model failed to load in them, for instance)."""


def serve_cluster(settings: ClusterSettings, *, host: str, port: int, ray_address: str | None = None) -> None:
    local = ray_address is None
    if local:
        settings = settings.model_copy(update={"model": str(resolve_model(settings.model))})
    _check_port_free(host, port)  # before minutes of starting replicas, not after
    with _sigterm_blocked_in_children() if local else contextlib.nullcontext():
        ray.init(address=ray_address, include_dashboard=False if local else None, logging_level=logging.WARNING)
    try:
        settings.check_fits(ray.cluster_resources())
        serve.start(proxy_location="Disabled")  # this process serves HTTP
    except BaseException:
        ray.shutdown()
        raise
    stop = _stop_on_signals()  # after ray.init, which installs a SIGTERM handler that exits at once
    try:
        _run(settings)
        if stop.is_set():
            return
        app = local_ingress(serve.get_deployment_handle(ENGINE_DEPLOYMENT, APP_NAME), settings)
        shown = f"[{host}]" if ":" in host else host
        log.info("serving %s from %s replicas on http://%s:%d/v1 (Ray Serve)", settings.model,
                 f"{settings.autoscaling.min_replicas}-{settings.autoscaling.max_replicas}" if settings.autoscaling
                 else settings.replicas, shown, port)
        serve_http(app, host, port)  # until SIGINT or SIGTERM, then the server drains
    finally:
        log.info("shutting down: stopping the replicas")
        serve.delete(APP_NAME)  # graceful: see the module's docstring
        if local:
            serve.shutdown()
        ray.shutdown()


def _run(settings: ClusterSettings) -> None:
    """Deploy the application; return once every replica is up."""
    try:
        serve.run(engine_app(settings), name=APP_NAME, route_prefix=None)
    except RuntimeError as exc:  # Ray Serve gave up on the deployment: say why, without Ray's traceback
        status = serve.status().applications.get(APP_NAME)
        engine = status.deployments.get(ENGINE_DEPLOYMENT) if status is not None else None
        reason = engine.message if engine is not None and engine.message else str(exc)
        raise DeploymentStartError(f"the replicas did not start: {reason.strip()}") from None


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise DeploymentStartError(f"cannot serve on {host}:{port}: {exc.strerror}") from None


@contextlib.contextmanager
def _sigterm_blocked_in_children():
    """Start the local Ray instance with SIGTERM blocked, a mask its daemons (GCS, raylet) and the
    replicas they start inherit. They share this process's group, so a SIGTERM sent to the group
    (`timeout`, `kill -- -PGID`, systemd's default KillMode) stopped them before this process had
    drained anything, and its shutdown then waited a minute for a GCS that was gone. Now the
    signal reaches this process alone, which drains as on a SIGTERM to its own PID; Ray stops
    its daemons with SIGKILL, and they die with this process (Ray's fate sharing) in any case."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _stop_on_signals() -> threading.Event:
    """While the replicas start, SIGINT or SIGTERM sets the event (the deployment finishes starting,
    then stops); a second one interrupts at once, and the application is deleted all the same.
    Once the server runs, it handles the signals itself (uvicorn's, then these again)."""
    stop = threading.Event()

    def handler(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log.info("stopping (once the deployment is up, if it is still starting; again to stop at once)")

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return stop
