"""The Ray Serve application: two deployments, Ray Serve's model-composition pattern.

- `Gateway` (the ingress, 0 CPUs, one replica): the FastAPI app, auth, parsing and validation, the seed drawn once,
  the HTTP metrics; it calls the model through a DeploymentHandle and retries a request whose replica died on a
  survivor with the same seed (serve.ingress.Ingress).
- `Model` (--replicas or --autoscale; its CPUs/GPUs): each replica holds a `serve.http.Service` (an Engine behind the
  request scheduler); Ray places the replicas across the cluster's nodes (SPREAD by default), the handle routes to
  them.

Batching happens inside a model replica: every request goes straight to the scheduler, which admits new requests at
each decoding step (Ray's @serve.batch would build the next batch while one runs and keep batches small). So a
replica takes up to max_batch decoding + max_queue waiting requests, and OVERFLOW more that it answers at once with
503; the handle's queue for the model is bounded too (a 503 past it), so nothing waits without limit.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
import typing
from typing import Any

from ray import serve
from ray.serve.metrics import Counter, Gauge, Histogram

from .config import INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT, LaunchConfig, ServiceConfig, scheduler_limits
from .http import Answer, HTTPError, Job, Service, build_app

APP_NAME = "magnet"
METRICS_PERIOD_S = 1.0  # how often the queue gauges and the batch-size histogram are updated
GATEWAY_GRACE_S = 5.0  # the ingress outlives the model's drain by this much, to send the last answers
OVERFLOW = 32  # requests a replica takes beyond its scheduler's max_batch + max_queue, to answer them 503


class RequestMetrics:
    """The ingress' Prometheus metrics beside Ray Serve's own (exported by each node's metrics agent)."""

    def __init__(self) -> None:
        self.latency = Histogram("magnet_request_latency_s", description="HTTP request latency at the ingress",
                                 boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128],
                                 tag_keys=("status",))
        self.requests = Counter("magnet_requests", description="HTTP requests answered", tag_keys=("status",))
        self.retries = Counter("magnet_retries", description="calls sent again after their model replica died")

    def request(self, status: int, latency_s: float) -> None:
        self.latency.observe(latency_s, tags={"status": str(status)})
        self.requests.inc(tags={"status": str(status)})

    def retried(self) -> None:
        self.retries.inc()


class QueueMetrics:
    """A model replica's scheduler: its queue, its batch, the requests per LM pass."""

    def __init__(self, max_batch: int) -> None:
        self.waiting = Gauge("magnet_queue_length", description="requests waiting in the replica's scheduler")
        self.decoding = Gauge("magnet_decoding", description="requests decoding together (the current batch)")
        self.batch = Histogram("magnet_batch_size", description="requests per LM pass",
                               boundaries=[float(b) for b in range(1, max_batch + 1)])


# Ray Serve has no setting for the address of a replica's inter-deployment gRPC server (`grpc_options` configures the
# gRPC *proxy*; ray-project/ray#64544 asks for one): it binds [::]. `_pin_internal_grpc` patches the one private
# function that binds it, so the Ray range is pinned in setup.py to the versions tested, and a Ray without that
# function fails the start with this message instead of silently listening on every interface.
RAY_TESTED = "ray[serve]>=2.60.0,<2.61"


def check_ray_supported() -> None:
    """Raise (before anything starts) when this Ray lacks the function `_pin_internal_grpc` patches."""
    import ray
    from ray.serve._private import replica

    if not callable(getattr(replica, "add_port_to_grpc_server", None)):
        raise RuntimeError(f"Ray {ray.__version__} is not supported by magnet serve: its Serve replica no longer "
                           "binds its gRPC server through ray.serve._private.replica.add_port_to_grpc_server, which "
                           f"magnet serve patches to keep that server off [::]; install {RAY_TESTED!r}")


def _pin_internal_grpc() -> None:
    """Ray Serve 2.60 binds each replica's inter-deployment gRPC server to [::] (ray/serve/_private/replica.py,
    `add_port_to_grpc_server(self._server, "[::]:0")`, no setting): bind the node's own address instead (loopback
    on a local Ray, see serve.cli.ray_environment). The ingress reaches the model through a handle, whose calls are Ray
    actor calls unless Serve's gRPC transport is switched on, which magnet serve does not do. Called in the replica
    before Serve starts that server; raises if Ray renamed it."""
    import ray
    from ray.serve._private import replica

    check_ray_supported()
    original = replica.add_port_to_grpc_server
    if getattr(original, "pinned", False):
        return
    node_ip = ray.util.get_node_ip_address()

    def pinned(server: Any, address: str) -> Any:
        if address.startswith("[::]:"):
            address = f"{node_ip}:{address[len('[::]:'):]}"
        return original(server, address)

    pinned.pinned = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = pinned


def _replica_name() -> str:
    import ray

    return f"{ray.get_runtime_context().get_node_id()}/{serve.get_replica_context().replica_id.unique_id}"


def _rebased(job: Job, spent: float) -> Job:
    """A job on this process's clock: it arrived `spent` seconds ago (the ingress' clock may be another node's)."""
    return dataclasses.replace(job, received=time.monotonic() - spent)


class Model:
    """A model replica: the engine behind the scheduler, called by the ingress through a handle. Answers travel as
    data (`Answer`), refusals included, so an exception out of a call means the replica failed, not the request."""

    def __init__(self, config: ServiceConfig) -> None:
        _pin_internal_grpc()
        self.service = Service(config, None, _replica_name())
        self.metrics = QueueMetrics(scheduler_limits(config)["max_batch"])
        self._stop = threading.Event()
        threading.Thread(target=self._poll, name="magnet-metrics", daemon=True).start()

    def _poll(self) -> None:
        sched, seen = self.service.scheduler, collections.Counter[int]()
        while not self._stop.wait(METRICS_PERIOD_S):
            waiting, active = sched.counts()
            self.metrics.waiting.set(waiting)
            self.metrics.decoding.set(active)
            now = collections.Counter(sched.batch_sizes)  # a copy: the loop thread keeps counting
            for size, n in (now - seen).items():
                for _ in range(n):
                    self.metrics.batch.observe(size)
            seen = now

    async def info(self) -> tuple[Any, Any]:
        """What the ingress builds its request schema from: (ModelConfig, GenerationConfig defaults)."""
        return self.service.engine.config, self.service.engine.defaults

    async def generate(self, job: Job, spent: float, as_json: bool) -> Answer:
        try:
            return Answer.of(await self.service.generate(_rebased(job, spent), as_json))
        except HTTPError as e:
            return Answer.error(e)

    async def stream(self, job: Job, spent: float, skip: int) -> typing.AsyncIterator[Answer | dict[str, str] | bytes]:
        """The headers (or the refusal, as an Answer), then the stream's items from item `skip` on: a stream that
        resumes on this replica after another died decodes the piece again and sends what its client lacks."""
        try:
            headers, body = self.service.open_stream(_rebased(job, spent))
        except HTTPError as e:
            yield Answer.error(e)
            return
        yield headers
        i = 0
        async for item in body:
            if i >= skip:
                yield item
            i += 1

    async def health(self) -> tuple[bool, int, int]:
        return await self.service.health()

    async def describe(self) -> dict[str, Any]:
        return await self.service.describe()

    def check_health(self) -> None:
        """Ray's periodic health check: a replica whose scheduler loop died is replaced."""
        if not self.service.scheduler.alive:
            raise RuntimeError("the replica's scheduler loop stopped")

    def __del__(self) -> None:
        # Serve calls this once ongoing requests are drained (or graceful_shutdown_timeout_s passed)
        self._stop.set()
        self.service.close()


@serve.ingress()  # the app is built per replica, once the model answers (`__serve_build_asgi_app__`: the late-bound
# app that serve.ingress documents for a call without an app)
class Gateway:
    def __init__(self, config: ServiceConfig, model: Any) -> None:
        _pin_internal_grpc()
        self.config, self.model = config, model  # model: the Model deployment's DeploymentHandle
        self.metrics = RequestMetrics()

    async def __serve_build_asgi_app__(self) -> Any:
        from .ingress import Ingress

        model_config, defaults = await self.model.info.remote()
        return build_app(Ingress(self.config, self.model, model_config, defaults, self.metrics))


def application(service: ServiceConfig, launch: LaunchConfig) -> Any:
    """The bound Serve application: `serve.run(application(...))`."""
    limits = scheduler_limits(service)
    per_replica = limits["max_batch"] + limits["max_queue"] + limits["max_streams"] + OVERFLOW
    options: dict[str, Any] = {
        "name": MODEL_DEPLOYMENT,
        "ray_actor_options": {"num_cpus": launch.replica_cpus, "num_gpus": launch.replica_gpus},
        # room beyond what the scheduler holds, so that overflow reaches the replica and gets its JSON 503 with
        # Retry-After at once (the router's count of a replica's requests lags); the handle queues at most as many
        # again, then the ingress answers 503 (BackPressureError)
        "max_ongoing_requests": per_replica,
        "max_queued_requests": per_replica,
        # in-flight requests finish (or reach their deadline) before a replica stops
        "graceful_shutdown_timeout_s": service.timeout,
    }
    if launch.autoscale is not None:
        lo, hi = launch.autoscale
        # a replica is busy at max_batch requests decoding together: past that, scale out
        options["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                         "target_ongoing_requests": limits["max_batch"]}
    else:
        options["num_replicas"] = launch.replicas
    threads = service.threads or max(1, int(launch.replica_cpus))  # torch threads = the CPUs Ray reserved
    service = dataclasses.replace(service, threads=threads)
    model = serve.deployment(Model).options(**options).bind(service)
    most = launch.autoscale[1] if launch.autoscale is not None else launch.replicas
    # the ingress only parses and waits: no CPU reserved; it holds what every model replica and the handle's queue
    # can, and the proxy's queue before it is bounded as much again (Serve's plain 503 past it)
    ingress = serve.deployment(Gateway).options(
        name=INGRESS_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=2 * per_replica * most, max_queued_requests=2 * per_replica * most,
        graceful_shutdown_timeout_s=service.timeout + GATEWAY_GRACE_S)
    return ingress.bind(service, model)
