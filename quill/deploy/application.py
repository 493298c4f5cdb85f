"""The Ray Serve applications: the engine deployment (`EngineReplica`, N replicas or autoscaled,
each with its threads' worth of CPUs, routed by `PrefixAffinityRouter`, sharing a `StatsBoard`),
`engine_app`, which `quill serve --replicas` deploys alone (its own process is the HTTP front, see
launch.py); and that deployment bound into the ingress deployment (`Ingress`, the HTTP front
behind Ray's proxy), `build_app`. Both are made from `ClusterSettings`; `app` is `build_app` for Ray
Serve's config files (`import_path: quill.deploy:app`, the settings as `args`)."""
from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import DeploymentActorConfig, RequestRouterConfig

from quill.deploy.board import StatsBoard
from quill.deploy.ingress import Ingress
from quill.deploy.replica import BOARD, EngineReplica
from quill.deploy.router import PrefixAffinityRouter
from quill.deploy.settings import ClusterSettings

# Quill logs each request itself (one JSON line, from the ingress); Ray's access log would add two more.
_LOGGING = {"enable_access_log": False}
ENGINE_DEPLOYMENT = "QuillEngine"
INGRESS_DEPLOYMENT = "QuillIngress"


def engine_app(settings: ClusterSettings) -> Application:
    """The engine replicas alone, answering `Submission`s through a deployment handle."""
    threads = settings.threads_per_replica
    routing = settings.routing
    engine = serve.deployment(EngineReplica).options(
        name=ENGINE_DEPLOYMENT,
        **settings.deployment_size(),
        max_ongoing_requests=settings.max_ongoing_requests,
        ray_actor_options={
            "num_cpus": threads, "num_gpus": settings.gpus_per_replica,
            # Sizes torch's OpenMP pool from the start, before the replica sets its threads.
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}},
        },
        health_check_period_s=settings.health_check_period_s,
        health_check_timeout_s=settings.health_check_timeout_s,
        graceful_shutdown_timeout_s=settings.graceful_shutdown_timeout_s,
        logging_config=_LOGGING,
        max_constructor_retry_count=3,  # a model that cannot load fails the deployment soon, with its error
        request_router_config=RequestRouterConfig(
            request_router_class=PrefixAffinityRouter,
            request_router_kwargs={"policy": routing.policy, "max_imbalance": routing.max_imbalance,
                                   "table_entries": routing.table_entries},
        ),
        deployment_actors=[DeploymentActorConfig(
            name=BOARD, actor_class=StatsBoard, actor_options={"num_cpus": 0},
            init_kwargs={"max_age_s": max(3.0, 6 * settings.stats_interval_s)},
        )],
    )
    return engine.bind(settings)


def build_app(settings: ClusterSettings) -> Application:
    """The engine replicas behind the ingress deployment, which Ray's HTTP proxy serves."""
    ingress = serve.deployment(Ingress).options(
        name=INGRESS_DEPLOYMENT, num_replicas=settings.ingress_replicas,
        # The server's own admission (--max-queue, 429) bounds the work; Ray should not queue in front of it.
        max_ongoing_requests=max(1000, 4 * settings.server.max_queue),
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=settings.graceful_shutdown_timeout_s,
        logging_config=_LOGGING,
    )
    return ingress.bind(engine_app(settings), settings)


def app(args: dict[str, Any]) -> Application:
    """Ray Serve's application builder: `args` are `ClusterSettings` fields."""
    return build_app(ClusterSettings.model_validate(args))
