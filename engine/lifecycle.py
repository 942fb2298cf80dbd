"""A request's life in the scheduler: one object per request (`Job`, or `Stream` for a piece streamed window by
window) holding its validated `Request`, its decoding state, its deadline and the future or queue it answers
through, with a `Status` that says where it is (vLLM v1's `Request` + `RequestStatus`).

    WAITING ─► ADMITTED ─► RUNNING ─► DECODED ─► FINISHED        (a Job)
       │           │          │          │
       └───────────┴──────────┴──────────┴─► FAILED / TIMED_OUT / CANCELLED

    WAITING ─► STREAMING ─► FINISHED / FAILED / TIMED_OUT / CANCELLED   (a Stream)

The transitions are methods, each run by the scheduler's loop thread (`engine.core`), except that `submit` creates
a Job WAITING. No torch here. Terminal statuses resolve the future (or end the stream) exactly once.
"""
from __future__ import annotations

import enum
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .magnet import Decoding
    from .request import Request
    from .results import Chunk, Generation


class RequestTimeout(TimeoutError):
    """A request's `timeout` (seconds from submit) passed before it finished; it left its batch."""


class Status(enum.Enum):
    WAITING = "waiting"  # queued, no batch slot yet
    ADMITTED = "admitted"  # holds a batch slot; its text is not encoded yet
    RUNNING = "running"  # decoding, one step per loop iteration
    DECODED = "decoded"  # tokens done; its codec call has not run yet
    STREAMING = "streaming"  # a Stream that has started (one step per iteration, a chunk per window)
    FINISHED = "finished"
    FAILED = "failed"
    TIMED_OUT = "timed out"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (Status.FINISHED, Status.FAILED, Status.TIMED_OUT, Status.CANCELLED)


HELD = (Status.WAITING, Status.ADMITTED, Status.RUNNING)  # what counts against max_batch + max_queue


@dataclass(eq=False)
class Job:
    """One short request (at most one segment), batched with the others one decoding step at a time."""

    request: Request  # validated once (Engine.request), one prompt
    future: Future
    submitted: float  # time.monotonic()
    deadline: float | None
    frames: int  # its share of an LM pass: rows ([cond; uncond] or cond) x frames
    render: Callable[[Generation], Any] | None = None  # run by the loop thread; the future resolves to its result
    status: Status = Status.WAITING
    started: float = 0.0
    dec: Decoding | None = None

    def admit(self) -> None:
        assert self.status is Status.WAITING, self.status
        self.status = Status.ADMITTED

    def begin(self) -> bool:
        """The future runs (False: it was cancelled by its caller while queued; the job is CANCELLED)."""
        if self.future.set_running_or_notify_cancel():
            return True
        self.status = Status.CANCELLED
        return False

    def run(self, dec: Decoding, now: float) -> None:
        assert self.status is Status.ADMITTED, self.status
        self.dec, self.started, self.status = dec, now, Status.RUNNING

    def decoded(self) -> None:
        assert self.status is Status.RUNNING, self.status
        self.status = Status.DECODED

    def finish(self, out: Generation) -> None:
        """The future's result: `out`, or `render(out)` when asked (a render failure is this request's)."""
        self.status = Status.FINISHED
        resolve(self.future, out, self.render)

    def fail(self, error: BaseException) -> None:
        """The future fails with `error` (unless its caller cancelled it while queued)."""
        self.status = Status.TIMED_OUT if isinstance(error, RequestTimeout) else Status.FAILED
        if not self.future.done() and (self.future.running() or self.future.set_running_or_notify_cancel()):
            self.future.set_exception(error)
        elif self.future.cancelled():
            self.status = Status.CANCELLED

    def cancel(self) -> None:
        """Dropped from the queue (close with cancel_pending)."""
        self.status = Status.CANCELLED
        self.future.cancel()


class Stream:
    """A streamed request (`Scheduler.stream`): iterate it for its `Chunk`s as windows complete (blocking); a
    failure (RequestTimeout, a loop error, shutdown) is raised by the iteration. `cancel()` when the consumer leaves
    early (a client hung up): the loop drops the piece at its next window."""

    def __init__(self, request: Request, deadline: float | None, render: Callable[[Chunk], Any] | None = None
                 ) -> None:
        self.request, self.deadline, self.render = request, deadline, render
        self.status = Status.WAITING
        # Engine.stream_steps (None after each step, a Chunk per window), started and advanced by the loop thread
        self.chunks: Iterator[Chunk | None] | None = None
        self._out: queue.Queue[Chunk | BaseException | None] = queue.Queue()
        self._cancelled = threading.Event()

    def put(self, item: Chunk | BaseException | None) -> None:
        """From the loop thread: a chunk, None at the end, or the failure."""
        self._out.put(item)

    def end(self, item: BaseException | None, status: Status | None = None) -> None:
        """From the loop thread: the stream's end (None) or its failure, with its final status (default: FINISHED
        at the end, TIMED_OUT for a RequestTimeout, FAILED otherwise)."""
        if status is None:
            status = (Status.FINISHED if item is None else Status.TIMED_OUT if isinstance(item, RequestTimeout)
                      else Status.FAILED)
        self.status = status
        self.put(item)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def next_chunk(self, timeout: float | None = None) -> Chunk | None:
        """The next chunk, None after the last; raises the request's failure (or queue.Empty past `timeout`)."""
        item = self._out.get(timeout=timeout)
        if isinstance(item, BaseException):
            self._out.put(item)  # every later call raises it too
            raise item
        if item is None:
            self._out.put(None)
        return item

    def __iter__(self) -> Iterator[Chunk]:
        while (chunk := self.next_chunk()) is not None:
            yield chunk


def resolve(future: Future, out: Generation, render: Callable[[Generation], Any] | None) -> None:
    """From the loop thread: the future's result, rendered there when asked (its failure is this request's)."""
    try:
        future.set_result(out if render is None else render(out))
    except Exception as e:  # noqa: BLE001 - a render failure belongs to this request's future
        future.set_exception(e)
