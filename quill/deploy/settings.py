"""What a replicated deployment is made of, in one validated object: the model and its engine
options (as `LLM` takes them), the server's `ServerConfig` (the ingress runs the same server), how
many replicas and how they scale, the threads each gets, how requests are routed, and Ray Serve's
health-check and shutdown timings. `quill serve --replicas` builds it from the command line; a
Ray Serve config file gives it as the application's `args` (see examples/ray-serve.yaml), and a
misspelt or out-of-range key is refused there with the field's name."""
from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from quill.errors import QuillError
from quill.server.config import ServerConfig

log = logging.getLogger("quill.deploy")


class ClusterCapacityError(QuillError):
    """The Ray cluster cannot place the replicas asked for."""


class Autoscaling(BaseModel):
    """Passed to Ray Serve's autoscaler: it adds replicas while each has more than
    `target_ongoing_requests` requests in flight, and removes them below, within the bounds."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


class Routing(BaseModel):
    """How the ingress picks a replica for each request (quill/deploy/affinity.py)."""

    model_config = ConfigDict(extra="forbid")
    # prefix: the replica that last saw the prompt's longest known prefix, unless it is overloaded;
    # least-loaded: the replica with the fewest requests in flight; random: any (a baseline).
    policy: Literal["prefix", "least-loaded", "random"] = "prefix"
    # How many more requests in flight the prefix's replica may have than the least-loaded one
    # before a request goes to the least-loaded one instead (and its prefix then lives on both).
    max_imbalance: int = Field(4, ge=0)
    max_blocks: int = Field(64, ge=1)  # leading KV blocks of a prompt that are hashed for affinity
    table_entries: int = Field(100_000, ge=1)  # block hashes remembered (least recently used go first)


class ClusterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    model: str  # a .gguf file, a Hugging Face directory or a known name, as each replica's node sees it
    engine: dict[str, Any] = Field(default_factory=dict)  # `LLM` keyword arguments: dtype, device, block_size...
    server: ServerConfig = Field(default_factory=ServerConfig)
    replicas: int = Field(1, ge=1)  # fixed count; `autoscaling` replaces it when given
    autoscaling: Autoscaling | None = None
    # Each replica's torch threads, and the CPUs Ray reserves for it: replicas x threads should not
    # exceed the cores, or the replicas slow each other down (and Ray will not place them).
    threads_per_replica: int = Field(1, ge=1)
    gpus_per_replica: float = Field(0.0, ge=0)
    # Requests in flight per replica before Ray holds further ones back. The engine batches and
    # queues them itself, so this is well above its batch; --max-queue still bounds the waiting.
    max_ongoing_requests: int = Field(128, ge=1)
    routing: Routing = Field(default_factory=Routing)
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    ingress_replicas: int = Field(1, ge=1)
    stats_interval_s: float = Field(0.5, gt=0)  # how often each replica publishes its engine stats
    # Engine outputs per item a replica streams back (merged; the first and the last go at once).
    # Each item costs a Ray hop (two behind Ray's proxy); above 1 the client gets tokens in groups of this many.
    stream_interval: int = Field(1, ge=1)
    retries: int = Field(1, ge=0)  # resubmissions of a request whose replica died before its first token
    # With no replica running for this long, a request waiting for its first token fails (503).
    unavailable_timeout_s: float = Field(60.0, gt=0)

    @property
    def graceful_shutdown_timeout_s(self) -> float:
        """Ray Serve gives a stopping replica this long to finish its requests: the server's grace
        plus a margin for the ingress's own drain to run first."""
        return self.server.shutdown_grace + 5.0

    def deployment_size(self) -> dict[str, Any]:
        """The Ray Serve deployment options that size the engine deployment."""
        if self.autoscaling is None:
            return {"num_replicas": self.replicas}
        return {"autoscaling_config": self.autoscaling.model_dump()}

    def max_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling else self.replicas

    def check_fits(self, resources: dict[str, float]) -> None:
        """Refuse replicas the cluster (Ray's `cluster_resources()`) cannot all place: Ray would keep
        the missing ones pending, and the application would never become ready."""
        needed = self.autoscaling.min_replicas if self.autoscaling else self.replicas
        for resource, per_replica, option in (("CPU", self.threads_per_replica, "--threads-per-replica"),
                                              ("GPU", self.gpus_per_replica, "--gpus-per-replica")):
            have = resources.get(resource, 0)
            if needed * per_replica > have:
                raise ClusterCapacityError(
                    f"{needed} replicas x {per_replica:g} {resource}s need {needed * per_replica:g} {resource}s, but "
                    f"the Ray cluster has {have:g}: lower --replicas or {option}")
        if self.max_replicas() * self.threads_per_replica > resources.get("CPU", 0):
            log.warning("autoscaling will stop where the cluster's %g CPUs are used up, short of %d replicas",
                        resources.get("CPU", 0), self.max_replicas())
