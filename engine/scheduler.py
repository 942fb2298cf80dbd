"""Many requests at once: iteration-level batching of MAGNeT decoding, each request decoded as if alone.

    submit() ─► queue (FIFO, ≤ max_queue) ─► loop thread: admit up to max_batch ─► per iteration:
        every active request's `magnet.Decoding.prepare()` ─► ONE packed LM pass (`LM.forward_packed`) ─►
        sampler calls with per-row parameters (one per request length) ─► each request's `advance()` ─►
        finished ones decode and leave

A request joins at the next iteration after it is submitted and leaves the iteration it finishes, whatever stage and
step the others are at (vLLM-style continuous batching; MAGNeT's fixed step count makes every iteration one step of
every active request).

Bit-equality with `engine.generate([prompt], **same settings)`: the pass packs the requests' rows without padding
(linears see only a row's own elements; attention runs per request over its own frames and own text length: see
`LM.forward_packed`), and the sampler only reduces over V within a position (requests of equal length share a
call, no padding). Each request draws its noise from its own generator (`magnet.row_generators(seed, 1)`), in
the solo run's order. tests/test_scheduler.py holds the equality on the fixture and the shipped model.

Threads: the loop thread does all torch work (text encoding, LM, sampling, codec); `submit` does none. On a CPU
build with OpenMP, torch runs ~1.4-1.7x slower in one thread once another thread has run parallel torch ops (each
keeps its own OpenMP pool). Measured on this 2-core EPYC, 16 one-second requests decoded in one batch: 1.5-1.7 s
with the model loaded and run in the same thread (main, or the loop thread), 2.6-3.3 s when loaded on the main
thread and run on another; with one intra-op thread everywhere 2.2-2.4 s. So pass a loader, `Scheduler(lambda:
engine.load(...))`: it runs in the loop thread, and the model never touches another thread. An engine already
loaded elsewhere works too, at the slower speed on such CPUs (bench/RESULTS.md has both).

Streams (`stream()`: any duration, long pieces included) run in the same loop thread, one window per loop
iteration between batched steps (`Engine.generate_stream`), so a long piece neither blocks the batch for minutes nor
touches the model from another thread; its chunks reach the caller through a queue.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .config import SettingError, check_int, check_real
from .longform import is_long
from .magnet import Decoding, decode_step, output_frames, row_generators

if TYPE_CHECKING:
    from .api import Chunk, Engine, Generation
    from .config import GenerationConfig
    from .request import Request


class QueueFull(RuntimeError):
    """`Scheduler.submit` past `max_queue` waiting requests: retry later or raise max_queue."""


class RequestTimeout(TimeoutError):
    """A request's `timeout` (seconds from submit) passed before it finished; it left its batch."""


@dataclass(eq=False)
class _Request:
    prompt: str | None
    gen: GenerationConfig
    future: Future
    submitted: float  # time.monotonic()
    deadline: float | None
    started: float = 0.0
    dec: Decoding | None = None


def _check_timeout(timeout: Any) -> float | None:
    """A SettingError naming <timeout>, as every front end spells it."""
    if timeout is None:
        return None
    return check_real("timeout", timeout, low=0.0, above=True, hint=" seconds (or omit it)")


class Stream:
    """A streamed request (`Scheduler.stream`): iterate it for its `Chunk`s as windows complete (blocking); a
    failure (RequestTimeout, a loop error, shutdown) is raised by the iteration. `cancel()` when the consumer leaves
    early (a client hung up): the loop drops the piece at its next window."""

    def __init__(self, request: Request, deadline: float | None) -> None:
        self.request, self.deadline = request, deadline
        self.chunks: Iterator[Chunk] | None = None  # Engine.generate_stream, started and advanced by the loop thread
        self._out: queue.Queue[Chunk | BaseException | None] = queue.Queue()
        self._cancelled = threading.Event()

    def put(self, item: Chunk | BaseException | None) -> None:
        """From the loop thread: a chunk, None at the end, or the failure."""
        self._out.put(item)

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


class _Collected(Stream):
    """A long piece submitted with `submit`: its chunks are joined into the Generation its future resolves to."""

    def __init__(self, request: Request, deadline: float | None, future: Future[Generation], sample_rate: int) -> None:
        super().__init__(request, deadline)
        self.future, self.sample_rate, self.parts = future, sample_rate, []

    def put(self, item: Chunk | BaseException | None) -> None:
        from .api import join

        if isinstance(item, BaseException):
            self.future.set_exception(item)
        elif item is None:
            self.future.set_result(join(self.parts, self.sample_rate, self.request.gen.seed))
        else:
            self.parts.append(item)


def _pass_frames(gen: GenerationConfig, engine: Engine) -> int:
    """A request's share of an LM pass: rows ([cond; uncond] or cond) x frames."""
    return (2 if gen.guided else 1) * output_frames(engine.config, gen)


def _check_engine(engine: Engine) -> None:
    if engine.config.kind != "magnet":
        raise ValueError(f"the scheduler batches MAGNeT decoding; this is a {engine.config.kind} model")


class Scheduler:
    """Serve `submit(prompt, **settings)` requests on one engine with iteration-level batching.

    `max_batch`: requests decoded together (each is 2 LM rows when guided, 1 when not). `max_frames`: optional
    budget of LM-pass frames (rows x T summed over the batch, like vLLM's max_num_batched_tokens); a request that
    would pass it waits (FIFO: nobody overtakes it), one alone always runs. On a CPU batching pays only while the
    pass is small (bench/RESULTS.md). `max_queue`: requests waiting to start; `submit` raises QueueFull past it.
    Use as a context manager; leaving it (or `close()`) finishes what is queued and in flight and joins the loop thread.
    """

    def __init__(self, engine: Engine | Callable[[], Engine], max_batch: int = 8, max_queue: int = 64,
                 max_frames: int | None = None) -> None:
        """`engine`: a loaded Engine, or a function that loads one, called in the loop thread (faster on CPU: see
        the module docstring); its errors are raised here."""
        self.check_limits(max_batch, max_queue, max_frames)
        self.max_batch, self.max_queue, self.max_frames = max_batch, max_queue, max_frames
        self._queue: collections.deque[_Request] = collections.deque()
        self._active: list[_Request] = []
        self._streams: list[Stream] = []  # streamed requests, one window per loop iteration each
        self._cv = threading.Condition()
        self._closed = False
        self._cancel_pending = False
        # iteration -> how many requests it decoded (for benchmarks); written by the loop thread only
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        ready: list[BaseException | None] = []
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(engine, ready, started), name="magnet-scheduler",
                                        daemon=True)
        self._thread.start()
        started.wait()
        if ready[0] is not None:
            self._thread.join()
            raise ready[0]

    @staticmethod
    def check_limits(max_batch: int, max_queue: int, max_frames: int | None = None) -> None:
        """A SettingError naming the first bad limit; front ends (magnet serve) call it before loading a model."""
        check_int("max_batch", max_batch, low=1)
        check_int("max_queue", max_queue, low=0)
        if max_frames is not None:
            check_int("max_frames", max_frames, low=1)

    def _run(self, engine: Engine | Callable[[], Engine], ready: list[BaseException | None],
             started: threading.Event) -> None:
        try:
            eng = engine() if callable(engine) else engine
            _check_engine(eng)
            self.engine = eng
            ready.append(None)
        except BaseException as e:  # handed to the constructor, which raises it in the caller's thread
            ready.append(e)
            return
        finally:
            started.set()
        try:
            self._loop()
        except BaseException as e:  # a bug in the loop itself: no future may wait forever
            with self._cv:
                self._closed = True
                stranded = self._active + list(self._queue)
                self._active, self._queue = [], collections.deque()
                streams, self._streams = self._streams, []
            for st in streams:
                st.put(RuntimeError(f"the scheduler's loop failed: {e!r}"))
            for req in stranded:
                if not req.future.done() and (req.future.running() or req.future.set_running_or_notify_cancel()):
                    req.future.set_exception(RuntimeError(f"the scheduler's loop failed: {e!r}"))
            raise

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(cancel_pending=exc_type is not None)

    def request(self, prompt: str | None, fields: dict[str, Any]) -> Request:
        """One prompt's request, validated once (Engine.request); what the scheduler cannot serve is refused."""
        from .config import GENERATION_FIELDS, GenerationConfig

        # GenerationConfig fields only: Engine.request's other keywords (prompts, prompt_codes, device, ...) must
        # not be reachable through `fields` (a front end forwards its clients' keys); named as unknown settings
        GenerationConfig.check_fields({k: v for k, v in fields.items() if k not in GENERATION_FIELDS})
        req = self.engine.request([prompt], **fields)
        if req.prompt_codes is not None or req.prompt_audio is not None or req.rescorer or req.ar_model:
            raise SettingError("the scheduler serves text-to-audio requests: audio prompts (prompt_codes / "
                               "prompt_audio) and the quality levers (rescorer / ar_model) go through "
                               "Engine.generate")
        return req

    def submit(self, prompt: str | None, *, timeout: float | None = None, **fields: Any) -> Future[Generation]:
        """Queue one request; thread-safe. -> a Future of its Generation (audio [1, 1, samples], codes [1, K, T]).

        `fields`: GenerationConfig fields, as for Engine.generate (a long piece runs window by window beside the
        batch, as `stream`, and resolves to the joined piece). Bad settings fail the returned future (ValueError
        or TypeError) without queueing; `timeout` seconds after submit an unfinished request leaves its batch and
        its future fails with RequestTimeout. Raises QueueFull when max_queue requests are waiting and
        RuntimeError once the scheduler is closed.
        """
        future: Future[Generation] = Future()
        try:
            timeout = _check_timeout(timeout)
            request = self.request(prompt, fields)
            gen = request.gen
        except (ValueError, TypeError) as e:
            future.set_exception(e)
            return future
        now = time.monotonic()
        if is_long(self.engine.config, gen):  # window by window beside the batch (`stream`), joined at the end
            future.set_running_or_notify_cancel()
            self._add_stream(_Collected(request, None if timeout is None else now + timeout, future,
                                        self.engine.sample_rate))
            return future
        req = _Request(prompt, gen, future, now, None if timeout is None else now + timeout)
        with self._cv:
            self._check_room()
            self._queue.append(req)
            self._cv.notify()
        return future

    def stream(self, prompt: str | None, *, timeout: float | None = None, **fields: Any) -> Stream:
        """Queue one request of any duration (a long piece window by window) and get its chunks as they complete:
        `for chunk in scheduler.stream(prompt, duration=60): ...`. The chunks are `Engine.generate_stream`'s for the
        same settings and seed. Bad settings raise here (SettingError); QueueFull and RuntimeError as `submit`."""
        timeout = _check_timeout(timeout)
        req = self.request(prompt, fields)
        stream = Stream(req, None if timeout is None else time.monotonic() + timeout)
        self._add_stream(stream)
        return stream

    def _add_stream(self, stream: Stream) -> None:
        with self._cv:
            self._check_room()
            self._streams.append(stream)
            self._cv.notify()

    def _check_room(self) -> None:
        """Under the lock: refuse work once closed or when max_queue requests (streams included) are waiting."""
        if self._closed:
            raise RuntimeError("the scheduler is closed: submit before close() or start a new one")
        waiting = len(self._queue) + sum(s.chunks is None for s in self._streams)
        if waiting >= self.max_queue:
            raise QueueFull(f"{waiting} requests are waiting (max_queue={self.max_queue}); retry later "
                            "or create the Scheduler with a larger max_queue")

    def counts(self) -> tuple[int, int]:
        """(waiting, decoding) requests now, streams included, for metrics and health; racy by design (no lock)."""
        started = sum(s.chunks is not None for s in self._streams)
        return len(self._queue) + len(self._streams) - started, len(self._active) + started

    @property
    def alive(self) -> bool:
        """True while the loop thread runs (False once closed and drained, or after a failure of the loop)."""
        return self._thread.is_alive()

    def close(self, cancel_pending: bool = False) -> None:
        """Stop taking requests, finish those in flight and (unless `cancel_pending`: cancel) those queued; join."""
        with self._cv:
            self._closed = True
            self._cancel_pending = self._cancel_pending or cancel_pending
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # ------------------------------------------------------------------------------------------ the loop thread

    def _loop(self) -> None:
        with torch.no_grad():
            while True:
                with self._cv:
                    while not (self._queue or self._active or self._streams or self._closed):
                        self._cv.wait()
                    if self._cancel_pending:
                        while self._queue:
                            self._queue.popleft().future.cancel()
                        for st in [st for st in self._streams if st.chunks is None]:
                            self._streams.remove(st)
                            st.put(RuntimeError("the scheduler closed before the stream started"))
                    if self._closed and not self._queue and not self._active and not self._streams:
                        return
                    streams = list(self._streams)
                    admitted = []
                    frames = sum(_pass_frames(r.gen, self.engine) for r in self._active)
                    while self._queue and len(self._active) + len(admitted) < self.max_batch:
                        more = _pass_frames(self._queue[0].gen, self.engine)
                        if self.max_frames is not None and frames and frames + more > self.max_frames:
                            break
                        frames += more
                        admitted.append(self._queue.popleft())
                for req in admitted:
                    self._admit(req)
                self._expire()
                if self._active:
                    self._iterate()
                for st in streams:
                    self._advance(st)

    def _admit(self, req: _Request) -> None:
        """Text encoding and decoding state of one request (its own errors fail only it)."""
        if not req.future.set_running_or_notify_cancel():
            return  # cancelled while queued
        if req.deadline is not None and time.monotonic() >= req.deadline:
            req.future.set_exception(RequestTimeout("the request timed out in the queue before it started"))
            return
        try:
            req.started = time.monotonic()
            req.dec = start_request(self.engine, req.prompt, req.gen)
        except Exception as e:  # noqa: BLE001 - any failure belongs to this request's future, the loop goes on
            req.future.set_exception(e)
            return
        self._active.append(req)

    def _advance(self, st: Stream) -> None:
        """One window of a streamed request (its first call starts it); its end or failure ends the stream."""
        item: Chunk | BaseException | None
        if st.cancelled:
            item = RuntimeError("the stream was cancelled")
        elif st.deadline is not None and time.monotonic() >= st.deadline:
            item = RequestTimeout("the streamed request did not finish within its timeout")
        else:
            try:
                if st.chunks is None:
                    st.chunks = self.engine.generate_stream(st.request)
                item = next(st.chunks, None)
            except Exception as e:  # noqa: BLE001 - a failure of this piece is its own, the loop goes on
                item = e
            if item is not None and not isinstance(item, BaseException):
                st.put(item)
                return
        with self._cv:
            self._streams.remove(st)
        st.put(item)

    def _expire(self) -> None:
        """Requests past their deadline leave: queued ones without starting, active ones mid-decoding."""
        now = time.monotonic()
        with self._cv:
            late = [r for r in self._queue if r.deadline is not None and now >= r.deadline]
            for req in late:
                self._queue.remove(req)
        for req in late:
            if req.future.set_running_or_notify_cancel():
                req.future.set_exception(RequestTimeout("the request timed out in the queue before it started"))
        for req in [r for r in self._active if r.deadline is not None and now >= r.deadline]:
            self._active.remove(req)
            req.future.set_exception(RequestTimeout(
                f"the request did not finish within its timeout ({req.deadline - req.submitted:.3g} s); it was at "
                f"step {req.dec.done} of {req.dec.total}"))

    def _iterate(self) -> None:
        """One decoding step of every active request: one LM pass, one sampler call; then the finished leave."""
        active = list(self._active)
        self.batch_sizes[len(active)] += 1
        try:
            decode_step(self.engine.lm_pass, self.engine.sample, [r.dec for r in active])
        except Exception as e:  # noqa: BLE001 - the pass touched every active request: fail them, keep serving
            for req in active:
                self._active.remove(req)
                req.future.set_exception(e)
            return
        for req in [r for r in active if r.dec.finished]:
            self._active.remove(req)
            self._finish(req)

    def _finish(self, req: _Request) -> None:
        from .api import Generation

        try:
            audio = self.engine.decode(req.dec.codes)
        except Exception as e:  # noqa: BLE001 - a codec failure is this request's
            req.future.set_exception(e)
            return
        done = time.monotonic()
        stats = {"queue_s": req.started - req.submitted, "latency_s": done - req.submitted}
        req.future.set_result(Generation(audio=audio, codes=req.dec.codes, sample_rate=self.engine.sample_rate,
                                         seed=req.gen.seed, stats=stats))


def start_request(eng: Engine, prompt: str | None, gen: GenerationConfig) -> Decoding:
    """A one-prompt request's decoding program with its step (its text's k/v), as `Engine.generate([prompt])`
    builds them."""
    step = eng.make_step(eng.text([prompt]))
    return Decoding(eng.config, gen, 1, eng.device, None, row_generators(gen.seed, 1, eng.device), step=step)
