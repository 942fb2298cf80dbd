"""The Ray Serve deployment: each replica holds a `serve.http.Service` (an Engine behind the request scheduler) and
serves its FastAPI app; Ray places the replicas across the cluster's nodes (SPREAD by default) and routes to them.

Batching happens inside a replica: every request goes straight to the scheduler, which admits new requests at each
decoding step (Ray's @serve.batch would build the next batch while one runs and keep batches small). So a replica
takes up to max_batch decoding + max_queue waiting requests, and OVERFLOW more that it answers at once with 503;
the router's own queue is bounded too (Serve answers 503 past it), so nothing waits without limit.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
from typing import Any

from ray import serve
from ray.serve.metrics import Counter, Gauge, Histogram

from .config import LaunchConfig, ServiceConfig, scheduler_limits
from .http import Service, build_app

APP_NAME = "magnet"
METRICS_PERIOD_S = 1.0  # how often the queue gauges and the batch-size histogram are updated
OVERFLOW = 32  # requests a replica takes beyond its scheduler's max_batch + max_queue, to answer them 503


class RayMetrics:
    """Prometheus metrics of one replica beside Ray Serve's own (exported by each node's metrics agent)."""

    def __init__(self, max_batch: int) -> None:
        self.latency = Histogram("magnet_request_latency_s", description="HTTP request latency on the replica",
                                 boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128],
                                 tag_keys=("status",))
        self.requests = Counter("magnet_requests", description="HTTP requests answered", tag_keys=("status",))
        self.waiting = Gauge("magnet_queue_length", description="requests waiting in the replica's scheduler")
        self.decoding = Gauge("magnet_decoding", description="requests decoding together (the current batch)")
        self.batch = Histogram("magnet_batch_size", description="requests per LM pass",
                               boundaries=[float(b) for b in range(1, max_batch + 1)])

    def request(self, status: int, latency_s: float) -> None:
        self.latency.observe(latency_s, tags={"status": str(status)})
        self.requests.inc(tags={"status": str(status)})


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
    on a local Ray, see serve.cli.ray_environment). Our one deployment is reached through Ray actor calls, which this
    server does not carry. Called in the replica before Serve starts that server; raises if Ray renamed it."""
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


@serve.ingress()  # the app is built per replica, after the model loaded (`__serve_build_asgi_app__`: the late-bound
# app that serve.ingress documents for a call without an app)
class Replica:
    def __init__(self, config: ServiceConfig) -> None:
        _pin_internal_grpc()
        self.metrics = RayMetrics(scheduler_limits(config)["max_batch"])
        import ray

        replica = f"{ray.get_runtime_context().get_node_id()}/{serve.get_replica_context().replica_id.unique_id}"
        self.service = Service(config, self.metrics, replica)
        self._seen: collections.Counter[int] = collections.Counter()
        self._poller: asyncio.Task | None = None

    async def __serve_build_asgi_app__(self) -> Any:
        self._poller = asyncio.get_running_loop().create_task(self._poll())
        return build_app(self.service)

    async def _poll(self) -> None:
        sched = self.service.scheduler
        while True:
            waiting, active = sched.counts()
            self.metrics.waiting.set(waiting)
            self.metrics.decoding.set(active)
            now = collections.Counter(sched.batch_sizes)  # a copy: the loop thread keeps counting
            for size, n in (now - self._seen).items():
                for _ in range(n):
                    self.metrics.batch.observe(size)
            self._seen = now
            await asyncio.sleep(METRICS_PERIOD_S)

    def check_health(self) -> None:
        """Ray's periodic health check: a replica whose scheduler loop died is replaced."""
        if not self.service.scheduler.alive:
            raise RuntimeError("the replica's scheduler loop stopped")

    def __del__(self) -> None:
        # Serve calls this once ongoing requests are drained (or graceful_shutdown_timeout_s passed)
        if self._poller is not None:
            self._poller.cancel()
        self.service.close()


def application(service: ServiceConfig, launch: LaunchConfig) -> Any:
    """The bound Serve application: `serve.run(application(...))`."""
    limits = scheduler_limits(service)
    in_replica = limits["max_batch"] + limits["max_queue"] + limits["max_streams"]
    options: dict[str, Any] = {
        "name": "Magnet",
        "ray_actor_options": {"num_cpus": launch.replica_cpus, "num_gpus": launch.replica_gpus},
        # room beyond what the scheduler holds, so that overflow reaches the replica and gets its JSON 503 with
        # Retry-After at once (the router's count of a replica's requests lags); the router queues at most as many
        # again, then Serve answers 503 itself (plain text): a last bound, not the normal path
        "max_ongoing_requests": in_replica + OVERFLOW,
        "max_queued_requests": in_replica + OVERFLOW,
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
    deployment = serve.deployment(Replica).options(**options)
    return deployment.bind(dataclasses.replace(service, threads=threads))
