"""The service's settings as frozen dataclasses: `ServiceConfig` travels to every replica, `LaunchConfig` stays with
`magnet serve` (where Ray runs and how many replicas). The CLI's flags are built from these fields (serve.cli)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from magnet_engine.engine.config import SettingError, check_int, check_real

# How the names in a SettingError are spelled for an HTTP client: JSON keys. GenerationConfig fields are their own
# keys; the request parts of engine.request get the HTTP key that carries them.
HTTP_NAMES = {"prompts": "prompt", "unconditional": "prompt (null)"}
# The application's two deployments (serve.deployment): the HTTP ingress, and the model it calls through a handle.
INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT = "Magnet", "Model"


@dataclass(frozen=True)
class ServiceConfig:
    """One replica: its model, scheduler and the limits of its HTTP API. Pickled to each replica by Ray, so it holds
    no secret: the API key only as its SHA-256."""

    model: str | None = None  # None: the shipped default model (a name, folder or Hugging Face id; never per request)
    device: str | None = None  # None: cuda when available
    max_batch: int | None = None  # None: the scheduler's default (engine.scheduler.Scheduler)
    max_queue: int | None = None  # None: the scheduler's default
    max_streams: int | None = None  # streamed requests held at once (None: the scheduler's default); past it: 503
    timeout: float = 120.0  # seconds: a request's deadline when it names none
    max_body: int = 64 * 1024  # bytes of a request body
    max_prompt_chars: int = 2000  # the text encoder truncates long prompts; longer ones are refused, not cut
    threads: int = 0  # torch threads in a replica; 0 = the CPUs Ray gave it
    deterministic: bool | None = None  # tokens independent of batchmates (Engine.set_deterministic); None: the
    # device's default (engine.config.deterministic_by_default: on on CPU; what it costs: README)
    graph: bool = False  # CUDA graphs: the scheduler's LM pass captured per layout (Engine.set_graph; CUDA only)
    api_key_sha256: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_real("timeout", self.timeout, low=0.0, above=True, hint=" seconds")
        check_int("max_body", self.max_body, low=1)
        check_int("max_prompt_chars", self.max_prompt_chars, low=1)
        check_int("threads", self.threads)
        from magnet_engine.engine.scheduler import Scheduler

        limits = scheduler_limits(self)
        Scheduler.check_limits(limits["max_batch"], limits["max_queue"], max_streams=limits["max_streams"])

    def key_matches(self, token: str | None) -> bool:
        """Constant-time comparison of a bearer token with the configured key (True when none is configured)."""
        import hmac

        if self.api_key_sha256 is None:
            return True
        return token is not None and hmac.compare_digest(key_digest(token), self.api_key_sha256)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def scheduler_limits(config: ServiceConfig) -> dict[str, int]:
    """max_batch, max_queue and max_streams: the config's, or the Scheduler's defaults (read from its signature:
    written once)."""
    import inspect

    from magnet_engine.engine.scheduler import Scheduler

    params = inspect.signature(Scheduler.__init__).parameters
    return {name: getattr(config, name) if getattr(config, name) is not None else params[name].default
            for name in ("max_batch", "max_queue", "max_streams")}


@dataclass(frozen=True)
class LaunchConfig:
    """Where and how `magnet serve` runs the service."""

    host: str = "127.0.0.1"  # the HTTP port binds loopback unless told otherwise
    port: int = 8000
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas; target ongoing requests = max_batch
    address: str | None = None  # an existing Ray cluster; None = start a local one (and stop it on exit)
    replica_cpus: float = 1.0  # Ray CPUs each replica reserves (its torch threads by default)
    replica_gpus: float = 0.0  # Ray GPUs each replica reserves (with --device cuda: one per replica, or a share)
    metrics_port: int | None = None  # Ray's Prometheus export port on this node; None = Ray picks one

    def __post_init__(self) -> None:
        check_int("port", self.port, high=65535)
        check_int("replicas", self.replicas, low=1)
        check_real("replica_cpus", self.replica_cpus, low=0.0)
        check_real("replica_gpus", self.replica_gpus, low=0.0)
        if self.autoscale is not None:
            lo, hi = (check_int("autoscale", n) for n in self.autoscale)
            if not 0 <= lo <= hi or hi < 1:
                raise SettingError(f"<autoscale> takes MIN,MAX replicas with 0 <= MIN <= MAX and MAX >= 1, got "
                                   f"{lo},{hi}")

