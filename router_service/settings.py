"""AppSettings: everything the Serve app needs, parsed once from the application's ``args`` (the Serve config
file, which ``moe-cluster serve`` and the Kubernetes manifests share) and passed explicitly to deployments."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cluster.config_fields import known_fields
from cluster.engine_config import ClusterConfig, EngineConfig, PoolConfig

DEMO_MODEL_NAME = "moe-cluster-demo"
SHUTDOWN_ERROR_S = 5.0  # engine replica: from the drain deadline to Serve's force-kill
INGRESS_MARGIN_S = 5.0  # ingress replica: outlives the engine replicas' force-kill by this much


@dataclass(frozen=True)
class AppSettings:
    model: str  # checkpoint directory, or a Hugging Face Hub id (each process resolves it: EngineConfig.model_dir)
    served_model_name: str = ""  # the name clients pass as "model"; default: the directory's name
    engine: str = "cluster"  # "cluster" (coordinators on one expert pool) or "local" (each replica one process)
    num_engines: int = 1  # engine replicas (coordinators) behind the ingress, all on the app's one expert pool
    engine_autoscaling: dict[str, Any] | None = None  # Serve autoscaling_config for the engine replicas
    # How the ingress picks an engine replica: Serve's power-of-two choices, or prefix affinity (Ray Serve's
    # PrefixCacheAffinityRouter: the replica whose prefix cache likely holds the prompt; prefix_routing.py), with
    # that router's keyword arguments in engine_routing_options.
    engine_routing: str = "power_of_two"
    engine_routing_options: dict[str, Any] = field(default_factory=dict)
    engine_options: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields
    cluster_options: dict[str, Any] = field(default_factory=dict)  # ClusterConfig fields (each coordinator)
    pool_options: dict[str, Any] = field(default_factory=dict)  # PoolConfig fields (the expert pool's shape)
    max_ongoing_requests: int = 256  # per engine replica; more wait in Serve's queue
    max_queued_requests: int = 512  # per ingress handle: beyond this a request gets 429
    max_request_bytes: int = 1 << 20  # request bodies above this are refused (413)
    request_timeout_s: float = 600.0  # default per-request deadline
    max_resumes: int = 2  # times the ingress resumes a request on another engine replica after its replica died
    # Shutdown (Ctrl-C, a redeploy): running requests get this long to finish; those still running then end
    # with a retryable "the server is shutting down" error (HTTP 503, gRPC UNAVAILABLE). The deployments'
    # graceful_shutdown_timeout_s are derived from it (engine_grace_s, ingress_grace_s).
    drain_timeout_s: float = 30.0
    stream_interval_ms: float = 50.0  # after the first token, a stream sends at most one chunk per interval
    # ... and all the replica's streams together at most this many chunks per second (0: no cap): each chunk
    # costs the Serve tier ~1-2 ms of CPU, so under many streams chunks grow instead of multiplying.
    stream_chunks_per_s: float = 200.0
    log_requests: bool = False  # one line per finished or refused request on the console of `moe-cluster serve`
    api_key_env: str | None = None  # when set, the API key is read from this environment variable
    ingress_replicas: int = 1
    ingress_autoscaling: dict[str, Any] | None = None  # Serve autoscaling_config for the ingress

    def __post_init__(self) -> None:
        if self.engine not in ("cluster", "local"):
            raise ValueError(f"engine must be 'cluster' or 'local', got {self.engine!r}")
        for name in ("num_engines", "max_ongoing_requests", "max_queued_requests", "max_request_bytes",
                     "ingress_replicas"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.max_resumes, bool) or not isinstance(self.max_resumes, int) or self.max_resumes < 0:
            raise ValueError(f"max_resumes must be an integer >= 0 (0: never resume), got {self.max_resumes!r}")
        if not isinstance(self.request_timeout_s, (int, float)) or self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be a positive number, got {self.request_timeout_s!r}")
        if isinstance(self.drain_timeout_s, bool) or not isinstance(self.drain_timeout_s, (int, float)) \
                or not 0 <= self.drain_timeout_s <= 3600:
            raise ValueError(f"drain_timeout_s must be in [0, 3600] seconds, got {self.drain_timeout_s!r}")
        if not isinstance(self.stream_interval_ms, (int, float)) or not 0 <= self.stream_interval_ms <= 1000:
            raise ValueError(f"stream_interval_ms must be in [0, 1000], got {self.stream_interval_ms!r}")
        if not isinstance(self.stream_chunks_per_s, (int, float)) or self.stream_chunks_per_s < 0:
            raise ValueError(f"stream_chunks_per_s must be >= 0 (0: no cap), got {self.stream_chunks_per_s!r}")
        if self.engine_routing not in ("power_of_two", "prefix_affinity"):
            raise ValueError(f"engine_routing must be 'power_of_two' or 'prefix_affinity', got {self.engine_routing!r}")
        if not isinstance(self.engine_routing_options, dict) or \
                (self.engine_routing_options and self.engine_routing != "prefix_affinity"):
            raise ValueError(f"engine_routing_options (a mapping) apply to engine_routing 'prefix_affinity' only, "
                             f"got {self.engine_routing_options!r} with {self.engine_routing!r}")
        if self.engine_autoscaling is not None and not isinstance(self.engine_autoscaling, dict):
            raise ValueError(f"engine_autoscaling must be a Serve autoscaling_config mapping, "
                             f"got {self.engine_autoscaling!r}")
        self.engine_config()  # validate the nested options now, with their own messages
        self.cluster_config()
        self.pool_config()

    @property
    def model_name(self) -> str:
        """What clients pass as "model": served_model_name, else a Hub id without its revision (as vLLM serves
        it), else the directory's name."""
        from cluster.model.hub import served_name

        return self.served_model_name or served_name(self.model)

    @property
    def engine_grace_s(self) -> float:
        """The engine deployment's graceful_shutdown_timeout_s: the drain deadline, then time for the requests
        still running to be failed, for their errors to reach the ingress, and for the engine to close."""
        return self.drain_timeout_s + SHUTDOWN_ERROR_S

    @property
    def ingress_grace_s(self) -> float:
        """The ingress's graceful_shutdown_timeout_s: longer than the engine's, so that whatever becomes of an
        engine replica (even a force-kill at its grace) reaches clients as a clean error, never a cut request."""
        return self.engine_grace_s + INGRESS_MARGIN_S

    def engine_config(self) -> EngineConfig:
        return EngineConfig.from_dict({"model": self.model, "progress": False} | self.engine_options)

    def cluster_config(self) -> ClusterConfig:
        return ClusterConfig.from_dict(self.cluster_options)

    def pool_config(self) -> PoolConfig:
        return PoolConfig.from_dict(self.pool_options)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> AppSettings:
        args = known_fields(cls, args, "application")
        if "model" not in args:
            raise ValueError("application args need 'model' (a checkpoint directory)")
        return cls(**args)
