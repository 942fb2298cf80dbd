"""Many requests at once: iteration-level batching of MAGNeT decoding, each request decoded as if alone.

    submit() ─► queue (FIFO, ≤ max_queue) ─► loop thread: admit up to max_batch ─► per iteration:
        ONE decoding step of every active request (`magnet.decode_step` over their static programs: re-mask,
        one LM pass through `Engine.lm_pass` (torch: packed along the rows, `LM.forward_packed`, replayed as a CUDA
        graph per batch layout with `Engine.set_graph`; onnxruntime: each alone), sampler calls with per-row
        parameters (one per request length), span scores) ─► finished ones decode and leave

A request joins at the next iteration after it is submitted and leaves the iteration it finishes, whatever stage and
step the others are at (vLLM-style continuous batching; MAGNeT's fixed step count makes every iteration one step of
every active request).

What a request's tokens depend on, per device and dtype:
- Deterministic engines (`Engine.set_deterministic`, opt-in: `load(..., deterministic=True)`, `magnet serve
  --deterministic`): exactly its solo `engine.generate([prompt], **same settings)` tokens, whatever its
  batchmates, their number, their arrival order and (CPU) the thread count, in fp32, fp16 and bf16. Every linear is
  row-invariant by construction (`LM.invariant_linear`); attention runs per request over its own frames and
  text (`LM.forward_packed`: no padding); the sampler reduces over V within a position; each request draws its
  noise, before its first step, from its own generator (`row_generators(seed, 1)`), in the solo run's order.
  tests/test_determinism.py and tests/test_scheduler.py hold it (bench/gpu.sh runs the former on CUDA in fp16 and
  bf16).
- Otherwise (the default, on every device): the GEMMs' kernels depend on the pass's row count, so a logit moves by
  ~1e-5 (CPU, fp32) to ~1e-4 (CUDA, fp16) with the batchmates and a near-tie can flip; the same seed alone still
  gives the same tokens.

Threads: the loop thread does all torch work (text encoding, LM, sampling, codec, and a caller's `render`);
`submit` does none. With libgomp (torch's OpenMP on Linux), every OpenMP thread pool counts against the CPUs: once
the pools of two threads (a caller that loaded the model, and the loop thread) hold more threads than there are
CPUs, libgomp stops letting idle workers spin and every parallel op pays a sleep/wake-up, ~1.5-2x slower in both
threads. So the constructor, which runs in the caller's thread, hands that thread's OpenMP workers back
(`release_openmp_threads`, OpenMP 5.0 `omp_pause_resource_all`) before the loop thread starts: `Scheduler(engine)`
with an engine loaded on the caller's thread is then as fast as `Scheduler(lambda: magnet_engine.load(...))` (a loader
still keeps every torch call in one thread). A caller that runs torch again later gets a pool again.

Work beside the batch is bounded: while requests are decoding, each loop iteration starts at most one admitted
request (its text encoding) and finishes at most one (codec decoding and its `render`), so a burst of arrivals or
of completions delays the others by one text or one codec call per step, not by a batch of them; an idle loop does
all of it at once.

Streams (`stream()`: any duration, long pieces included) run in the same loop thread, one decoding step per loop
iteration beside the batch's step (`Engine.stream_steps`; a window's codec decoding at its end), so a long piece
neither holds the batch for a window nor touches the model from another thread; its chunks reach the caller
through a queue. At most `max_streams` are held (started or waiting); past it `stream` (and `submit` of a long
piece) raise QueueFull.

Admission: `submit` refuses (QueueFull) only when the batch's free slots and `max_queue` are both used up, counted
at submit time, so a burst of `max_batch` requests into an idle scheduler is taken whole even with max_queue=0.

A failed LM pass does not fail the whole batch: each request it left unadvanced is retried once alone (its noise was
drawn before its first step, so the retry draws nothing), and only the requests that fail alone fail (a pass of one
request has nobody to retry).
"""
from __future__ import annotations

import collections
import logging
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

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .api import Chunk, Engine, Generation
    from .config import GenerationConfig
    from .request import Request


_END = object()  # a stream's steps have run out


class QueueFull(RuntimeError):
    """`Scheduler.submit` past `max_queue` waiting requests: retry later or raise max_queue."""


class SchedulerClosed(RuntimeError):
    """Work handed to a Scheduler after `close()`."""


class RequestTimeout(TimeoutError):
    """A request's `timeout` (seconds from submit) passed before it finished; it left its batch."""


@dataclass(eq=False)
class _Request:
    prompt: str | None
    gen: GenerationConfig
    future: Future
    submitted: float  # time.monotonic()
    deadline: float | None
    render: Callable[[Generation], Any] | None = None  # run by the loop thread; the future resolves to its result
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

    def __init__(self, request: Request, deadline: float | None, render: Callable[[Chunk], Any] | None = None
                 ) -> None:
        self.request, self.deadline, self.render = request, deadline, render
        # Engine.stream_steps (None after each step, a Chunk per window), started and advanced by the loop thread
        self.chunks: Iterator[Chunk | None] | None = None
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

    def __init__(self, request: Request, deadline: float | None, future: Future[Generation], sample_rate: int,
                 render: Callable[[Generation], Any] | None = None) -> None:
        super().__init__(request, deadline)
        self.future, self.sample_rate, self.parts, self.render_whole = future, sample_rate, [], render

    def put(self, item: Chunk | BaseException | None) -> None:
        from .api import join

        if isinstance(item, BaseException):
            self.future.set_exception(item)
        elif item is None:
            _resolve(self.future, join(self.parts, self.sample_rate, self.request.gen.seed), self.render_whole)
        else:
            self.parts.append(item)


def _resolve(future: Future, out: Generation, render: Callable[[Generation], Any] | None) -> None:
    """From the loop thread: the future's result, rendered there when asked (its failure is this request's)."""
    try:
        future.set_result(out if render is None else render(out))
    except Exception as e:  # noqa: BLE001 - a render failure belongs to this request's future
        future.set_exception(e)


def release_openmp_threads() -> bool:
    """Hand the calling thread's OpenMP worker threads back (libgomp, OpenMP 5.0 `omp_pause_resource_all`): True
    when released. Without it, a thread that ran parallel torch ops keeps a pool that, beside another thread's, makes
    libgomp throttle every pool (module docstring). A no-op for other OpenMP runtimes (Intel's and LLVM's hard pause
    shut the whole runtime down, not one thread's pool) and where libgomp is not loaded."""
    import ctypes
    import os

    mode = getattr(os, "RTLD_NOLOAD", None)
    if mode is None:  # Windows: no libgomp
        return False
    try:
        gomp = ctypes.CDLL("libgomp.so.1", mode=mode | os.RTLD_LAZY)  # only the copy torch already loaded
        pause = gomp.omp_pause_resource_all
    except (OSError, AttributeError):
        return False
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause(2) == 0  # omp_pause_hard; -1 inside a parallel region (nothing released)


def default_max_frames(engine: Engine, max_batch: int) -> int:
    """The LM-pass budget when none is given: `max_batch` guided requests of one full segment each (a request never
    exceeds a segment: longer pieces run as streams), so the pass, and its activations, are bounded by the model."""
    return 2 * max_batch * engine.config.max_frames


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
                 max_frames: int | None = None, max_streams: int = 4) -> None:
        """`engine`: a loaded Engine, or a function that loads one, called in the loop thread (all torch work in one
        thread); its errors are raised here. `max_frames` None: `default_max_frames`. `max_streams`: streamed
        requests held at once (started or waiting)."""
        self.check_limits(max_batch, max_queue, max_frames, max_streams)
        self.max_batch, self.max_queue, self.max_streams = max_batch, max_queue, max_streams
        self.max_frames = max_frames  # None: sized from the model once loaded (`default_max_frames`)
        self._queue: collections.deque[_Request] = collections.deque()
        self._starting: list[_Request] = []  # admitted (a batch slot each), text not encoded yet; under the lock
        self._active: list[_Request] = []
        self._done: collections.deque[_Request] = collections.deque()  # finished decoding, codec not run yet
        self._streams: list[Stream] = []  # streamed requests, one decoding step per loop iteration each
        self._cv = threading.Condition()
        self._closed = False
        self._cancel_pending = False
        # iteration -> how many requests it decoded (for benchmarks); written by the loop thread only
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        ready: list[BaseException | None] = []
        started = threading.Event()
        release_openmp_threads()  # this (the caller's) thread may have run torch: the loop thread runs it from now on
        self._thread = threading.Thread(target=self._run, args=(engine, ready, started), name="magnet-scheduler",
                                        daemon=True)
        self._thread.start()
        started.wait()
        if ready[0] is not None:
            self._thread.join()
            raise ready[0]

    @staticmethod
    def check_limits(max_batch: int, max_queue: int, max_frames: int | None = None, max_streams: int = 1) -> None:
        """A SettingError naming the first bad limit; front ends (magnet serve) call it before loading a model."""
        check_int("max_batch", max_batch, low=1)
        check_int("max_queue", max_queue, low=0)
        if max_frames is not None:
            check_int("max_frames", max_frames, low=1)
        check_int("max_streams", max_streams, low=0)

    def _run(self, engine: Engine | Callable[[], Engine], ready: list[BaseException | None],
             started: threading.Event) -> None:
        try:
            eng = engine() if callable(engine) else engine
            _check_engine(eng)
            self.engine = eng
            if self.max_frames is None:
                self.max_frames = default_max_frames(eng, self.max_batch)
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
                stranded = self._active + list(self._queue) + self._starting + list(self._done)
                self._active, self._queue, self._starting, self._done = [], collections.deque(), [], collections.deque()
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

    def submit(self, prompt: str | None, *, timeout: float | None = None,
               render: Callable[[Generation], Any] | None = None, **fields: Any) -> Future[Generation]:
        """Queue one request; thread-safe. -> a Future of its Generation (audio [1, 1, samples], codes [1, K, T]), or
        of `render(generation)` when given: the loop thread runs it (e.g. a service's audio encoding, kept off its
        event loop and in the one thread that runs torch); its errors fail this future only.

        `fields`: GenerationConfig fields, as for Engine.generate (a long piece runs window by window beside the
        batch, as `stream`, and resolves to the joined piece). Bad settings fail the returned future (ValueError
        or TypeError) without queueing; `timeout` seconds after submit an unfinished request leaves its batch and
        its future fails with RequestTimeout. Raises QueueFull when the batch's free slots and max_queue are used up
        (a long piece: when max_streams are held) and RuntimeError once the scheduler is closed.
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
                                        self.engine.sample_rate, render))
            return future
        req = _Request(prompt, gen, future, now, None if timeout is None else now + timeout, render)
        with self._cv:
            self._check_room()
            self._queue.append(req)
            self._cv.notify()
        return future

    def stream(self, prompt: str | None, *, timeout: float | None = None, render: Callable[[Chunk], Any] | None = None,
               **fields: Any) -> Stream:
        """Queue one request of any duration (a long piece window by window) and get its chunks as they complete:
        `for chunk in scheduler.stream(prompt, duration=60): ...`. The chunks are `Engine.generate_stream`'s for the
        same settings and seed (`render(chunk)` instead when given, run by the loop thread). Bad settings raise here
        (SettingError); QueueFull past max_streams streams held, RuntimeError once closed."""
        timeout = _check_timeout(timeout)
        req = self.request(prompt, fields)
        stream = Stream(req, None if timeout is None else time.monotonic() + timeout, render)
        self._add_stream(stream)
        return stream

    def _add_stream(self, stream: Stream) -> None:
        with self._cv:
            self._check_open()
            if len(self._streams) >= self.max_streams:
                raise QueueFull(f"{len(self._streams)} streamed requests are running or waiting (max_streams="
                                f"{self.max_streams}); retry later or create the Scheduler with a larger max_streams")
            self._streams.append(stream)
            self._cv.notify()

    def _check_open(self) -> None:
        if self._closed:
            raise SchedulerClosed("the scheduler is closed: submit before close() or start a new one")

    def _check_room(self) -> None:
        """Under the lock: refuse a request once closed, or when the batch's free slots and max_queue are used up
        (requests decoding, admitted and queued, against max_batch + max_queue)."""
        self._check_open()
        held = len(self._active) + len(self._starting) + len(self._queue)
        if held >= self.max_batch + self.max_queue:
            raise QueueFull(f"{len(self._queue)} requests are waiting beside a full batch of {self.max_batch} "
                            f"(max_queue={self.max_queue}); retry later or create the Scheduler with a larger "
                            "max_queue")

    def counts(self) -> tuple[int, int]:
        """(waiting, decoding) requests now, streams included, for metrics and health; racy by design (no lock)."""
        started = sum(s.chunks is not None for s in self._streams)
        waiting = len(self._queue) + len(self._starting) + len(self._streams) - started
        return waiting, len(self._active) + len(self._done) + started

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
                    while not (self._queue or self._active or self._streams or self._starting or self._done
                               or self._closed):
                        self._cv.wait()
                    if self._cancel_pending:
                        while self._queue:
                            self._queue.popleft().future.cancel()
                        for st in [st for st in self._streams if st.chunks is None]:
                            self._streams.remove(st)
                            st.put(RuntimeError("the scheduler closed before the stream started"))
                    if self._closed and not (self._queue or self._active or self._streams or self._starting
                                             or self._done):
                        return
                    streams = list(self._streams)
                    slots = self._active + self._starting
                    frames = sum(_pass_frames(r.gen, self.engine) for r in slots)
                    while self._queue and len(self._active) + len(self._starting) < self.max_batch:
                        more = _pass_frames(self._queue[0].gen, self.engine)
                        if frames and frames + more > self.max_frames:
                            break
                        frames += more
                        self._starting.append(self._queue.popleft())
                    starting = list(self._starting)
                # beside a running batch, one text encoding and one codec call per step (module docstring)
                busy = bool(self._active)
                for req in starting[:1] if busy else starting:
                    self._admit(req)
                for _ in range(min(1, len(self._done)) if busy else len(self._done)):
                    self._finish(self._done.popleft())
                self._expire()
                if self._active:
                    self._iterate()
                for st in streams:
                    self._advance(st)

    def _admit(self, req: _Request) -> None:
        """Text encoding and decoding state of one admitted request (its own errors fail only it); it moves from
        the admitted to the active ones under the lock, so that `submit` never sees it in neither or both."""
        ok = False
        try:
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
            ok = True
        finally:
            with self._cv:
                self._starting.remove(req)
                if ok:
                    self._active.append(req)

    def _advance(self, st: Stream) -> None:
        """One decoding step of a streamed request (its first call starts it; `Engine.stream_steps`), a chunk when
        it completes a window; its end or failure ends the stream."""
        item: Chunk | BaseException | None
        if st.cancelled:
            item = RuntimeError("the stream was cancelled")
        elif st.deadline is not None and time.monotonic() >= st.deadline:
            item = RequestTimeout("the streamed request did not finish within its timeout")
        else:
            try:
                if st.chunks is None:
                    st.chunks = self.engine.stream_steps(st.request)
                item = next(st.chunks, _END)
                if item is None:
                    return  # a step of the piece, between two of the batch's
                item = None if item is _END else item if st.render is None else st.render(item)
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
        """One decoding step of every active request: one LM pass, one sampler call; then the finished leave (their
        codec runs in a later iteration, see `_loop`)."""
        active = list(self._active)
        self.batch_sizes[len(active)] += 1
        marks = [r.dec.done for r in active]
        try:
            decode_step(self.engine.lm_pass, self.engine.sample, [r.dec for r in active])
        except Exception as e:  # noqa: BLE001 - the pass touched every active request: retry them one by one
            self._retry_alone(active, marks, e)
        for req in [r for r in self._active if r.dec.finished]:
            self._active.remove(req)
            self._done.append(req)

    def _retry_alone(self, active: list[_Request], marks: list[int], error: Exception) -> None:
        """After a failed pass: each request it did not advance runs this step again alone, with the same pre-drawn
        noise (`prepare` is idempotent: it re-masks from the same scores), so its tokens stay those of its solo run; a
        request that fails alone fails, the others go on. One request alone: nothing to retry."""
        if len(active) == 1:
            self._active.remove(active[0])
            active[0].future.set_exception(error)
            return
        log.warning("magnet scheduler: a pass of %d requests failed (%r); retrying each alone", len(active), error)
        for req, done in zip(active, marks):
            if req.dec.done != done:  # its step completed before the failure
                continue
            try:
                decode_step(self.engine.lm_pass, self.engine.sample, [req.dec])
            except Exception as e:  # noqa: BLE001 - this request fails alone: it is the failing one
                self._active.remove(req)
                req.future.set_exception(e)

    def _finish(self, req: _Request) -> None:
        from .api import Generation

        try:
            audio = self.engine.decode(req.dec.codes)
        except Exception as e:  # noqa: BLE001 - a codec failure is this request's
            req.future.set_exception(e)
            return
        done = time.monotonic()
        stats = {"queue_s": req.started - req.submitted, "latency_s": done - req.submitted}
        _resolve(req.future, Generation(audio=audio, codes=req.dec.codes, sample_rate=self.engine.sample_rate,
                                        seed=req.gen.seed, stats=stats), req.render)


def start_request(eng: Engine, prompt: str | None, gen: GenerationConfig) -> Decoding:
    """A one-prompt request's decoding program with its step (its text's k/v), as `Engine.generate([prompt])`
    builds them."""
    step = eng.make_step(eng.text([prompt]))
    return Decoding(eng.config, gen, 1, eng.device, None, row_generators(gen.seed, 1, eng.device), step=step)
