"""The ingress: the HTTP front of `magnet serve` (a `serve.http.Front`), apart from the model. It parses and checks
a request, draws its seed once (`RequestSchema.parse`), and calls a model replica (serve.deployment.Model: the
engine behind the scheduler) through a Ray Serve `DeploymentHandle`.

A request's output is fixed by its validated settings and seed, so when the replica holding it dies (a handle call
fails with `RayActorError`: ActorDiedError, ActorUnavailableError) the same Job goes again to a survivor, or to the
replica Serve starts in place of the dead one, until the request's deadline: a replica's death costs latency, not the
request. (The audio is the same bytes when the service is deterministic, the CPU's default or `--deterministic`;
otherwise a near-tie may flip with other batchmates, as for any request.) Answers say how often they were retried
(X-Retries). Nothing else is retried: a refusal (4xx) or an engine error comes back as the replica's answer, once.

A stream resumes at the first window its client has not received: the replica decodes the piece again and sends
from that window on. When it cannot (the deadline passed) the connection ends without the chunked terminator, so a
client sees a broken transfer, never a short WAV that looks complete.

Admission stays honest: a full replica answers its own 503 with Retry-After at once, and Serve's bound on the
requests queued for the model deployment (`max_queued_requests`) is a 503 here (BackPressureError). A call never
waits past the request's deadline: 504.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import typing
from typing import TYPE_CHECKING, Any, Protocol

from starlette.responses import Response, StreamingResponse

from .config import ServiceConfig
from .http import MEDIA_TYPES, Answer, HTTPError, Job, Metrics, RequestSchema

if TYPE_CHECKING:
    from magnet_engine.engine.config import GenerationConfig, ModelConfig

log = logging.getLogger("ray.serve")
PAUSE_S = (0.05, 1.0)  # the pause before a retry: first, and at most (doubling)
GRACE_S = 2.0  # past a request's deadline, how long a call may run on before the ingress gives up (the replica's
# own 504, which names the timeout, normally comes first)


class IngressMetrics(Metrics, Protocol):
    def retried(self) -> None: ...


def replica_died(e: BaseException) -> bool:
    """The call failed because its replica died or cannot be reached: the request itself is not at fault."""
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve.exceptions import ReplicaUnavailableError

    if isinstance(e, RayTaskError):  # an actor error surfaced through a task
        e = e.cause
    return isinstance(e, (RayActorError, ReplicaUnavailableError))


def refusal(e: BaseException) -> HTTPError | None:
    """Serve's own refusals as the answers a client can act on: a full deployment queue or no replica (503)."""
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(e, BackPressureError):
        return HTTPError(503, "every replica's queue is full; retry after Retry-After seconds",
                         headers={"Retry-After": "1"})
    if isinstance(e, DeploymentUnavailableError):
        return HTTPError(503, "the model has no replica to serve this request; retry", headers={"Retry-After": "1"})
    return None


class StreamCut(RuntimeError):
    """A stream that could not resume after its replica died; raised into the response body to break it."""


@dataclasses.dataclass
class Attempts:
    """One request's calls: its deadline on this process's clock, and the retries so far."""

    job: Job
    metrics: IngressMetrics | None
    retries: int = 0

    @property
    def deadline(self) -> float:
        return self.job.received + self.job.timeout

    def remaining(self) -> float:
        """Seconds left (HTTPError 504 when none)."""
        return self.job.left(f" (after {self.retries} retries on a replica's death)" if self.retries else "")

    def sent(self) -> tuple[Job, float]:
        """The job for the next call, and the seconds it has spent here so far (the replica re-bases its clock)."""
        return self.job, time.monotonic() - self.job.received

    async def after_death(self, e: BaseException) -> None:
        """A replica died under the call: count it, then pause (doubling) unless the deadline is nearer."""
        self.retries += 1
        if self.metrics is not None:
            self.metrics.retried()
        log.warning("magnet: retrying a request (seed %s) after its replica died: %s", self.job.fields.get("seed"),
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        pause = min(PAUSE_S[0] * 2 ** (self.retries - 1), PAUSE_S[1])
        await asyncio.sleep(min(pause, max(0.0, self.deadline - time.monotonic())))

    async def within(self, call: typing.Awaitable[Any], cancel: typing.Callable[[], Any]) -> Any:
        """Await a handle call until the deadline (plus GRACE_S); past it: cancel the call, 504."""
        try:
            return await asyncio.wait_for(call, self.remaining() + GRACE_S)
        except asyncio.TimeoutError:
            cancel()
            self.remaining()  # raises the 504
            raise


class Ingress:
    """The `Front` of the ingress deployment: calls the model deployment through `handle` (a DeploymentHandle, or a
    stand-in with the same methods in tests), retrying a request whose replica died."""

    def __init__(self, config: ServiceConfig, handle: Any, model: ModelConfig, defaults: GenerationConfig,
                 metrics: IngressMetrics | None = None) -> None:
        self.config, self.handle, self.metrics = config, handle, metrics
        self.schema = RequestSchema(config, model, defaults)

    @staticmethod
    async def _retried(attempts: Attempts, send: typing.Callable[[], tuple[typing.Awaitable[Any], Any]]) -> Any:
        """A handle call, `send()` -> (what to await, how to cancel it), sent again while its replica dies; Serve's
        refusals as 503s, anything else raised once."""
        while True:
            attempts.remaining()
            call, cancel = send()
            try:
                return await attempts.within(call, cancel)
            except HTTPError:
                raise
            except Exception as e:
                if (answer := refusal(e)) is not None:
                    raise answer from None
                if not replica_died(e):
                    raise
                await attempts.after_death(e)

    async def _call(self, attempts: Attempts, method: str, *args: Any) -> Any:
        """One handle call of a job (non-streaming), retried while its replica dies."""
        def send() -> tuple[Any, Any]:
            response = getattr(self.handle, method).remote(*attempts.sent(), *args)
            return response, response.cancel

        return await self._retried(attempts, send)

    async def generate(self, job: Job, as_json: bool) -> Response:
        attempts = Attempts(job, self.metrics)
        answer: Answer = await self._call(attempts, "generate", as_json)
        return answer.response(**{"X-Retries": str(attempts.retries),
                                  "X-Latency": f"{time.monotonic() - job.received:.6g}"})

    async def _open(self, attempts: Attempts, skip: int) -> tuple[Any, Answer | dict[str, str]]:
        """Start a stream on a replica from window item `skip`: the generator and its first item (the headers, or
        the replica's refusal as an Answer); retried while replicas die."""
        def send() -> tuple[Any, Any]:
            gen = self.handle.options(stream=True).stream.remote(*attempts.sent(), skip)

            async def first() -> tuple[Any, Any]:
                return gen, await gen.__anext__()

            return first(), gen.cancel

        return await self._retried(attempts, send)

    async def stream(self, job: Job) -> Response:
        attempts = Attempts(job, self.metrics)
        gen, first = await self._open(attempts, 0)
        if isinstance(first, Answer):
            return first.response(**{"X-Retries": str(attempts.retries)})
        return StreamingResponse(self._resumed(attempts, gen), media_type=MEDIA_TYPES[".wav"],
                                 headers=first | {"X-Retries": str(attempts.retries)})

    async def _resumed(self, attempts: Attempts, gen: Any) -> typing.AsyncIterator[bytes]:
        """The stream's items; when its replica dies, the rest from a survivor (same job, from the next item)."""
        sent, finished = 0, False
        try:
            while True:
                try:
                    async for item in gen:
                        yield item
                        sent += 1
                    finished = True
                    return
                except Exception as e:
                    if not replica_died(e):
                        raise
                    await attempts.after_death(e)
                gen = await self._reopen(attempts, sent)
        finally:
            if not finished:  # the client hung up (or the stream broke): the replica frees its stream slot
                gen.cancel()

    async def _reopen(self, attempts: Attempts, sent: int) -> Any:
        """The stream resumed at item `sent` on a survivor, waiting for a slot while they are full; StreamCut when
        the deadline passes first."""
        while True:
            try:
                gen, first = await self._open(attempts, sent)
            except HTTPError as e:
                raise StreamCut(f"a streamed request could not resume at window item {sent} after its replica "
                                f"died: {e.message}") from None
            if not isinstance(first, Answer):
                return gen
            await asyncio.sleep(max(0.0, min(float(first.headers.get("retry-after", 1)),
                                             attempts.deadline - time.monotonic())))

    async def health(self) -> tuple[bool, int, int]:
        """A model replica's health (one, as the router picks it)."""
        try:
            return await self.handle.health.remote()
        except Exception as e:
            if replica_died(e) or refusal(e) is not None:
                return False, 0, 0
            raise

    async def describe(self) -> dict[str, Any]:
        return await self.handle.describe.remote()
