"""Many requests at once: iteration-level batching of MAGNeT decoding, each request decoded as if alone.

    submit() ─► queue (FIFO, ≤ max_queue) ─► loop thread: admit up to max_batch ─► per iteration:
        ONE decoding step of every active request (`magnet.decode_step` over their static programs: re-mask,
        one LM pass through `Engine.lm_pass` (torch: packed along the rows, `LM.forward_packed`, replayed as a CUDA
        graph per batch layout with `Engine.set_graph`; onnxruntime: each alone), sampler calls with per-row
        parameters (one per request length), span scores) ─► finished ones decode and leave

The parts (vLLM v1's split): `engine.lifecycle` (one object per request with its status), `engine.policy` (pure:
statuses and limits -> a plan of one iteration: who is admitted, refused, timed out, who runs), `engine.core` (the
plan carried out: one `decode_step`, statuses updated). This module is the thin threaded shell: a queue in, futures
and streams out.

A request joins at the next iteration after it is submitted and leaves the iteration it finishes, whatever stage and
step the others are at (vLLM-style continuous batching; MAGNeT's fixed step count makes every iteration one step of
every active request).

What a request's tokens depend on, per device and dtype:
- Deterministic engines (`Engine.set_deterministic`; `load`'s default on CPU, opt-in on CUDA: `load(...,
  deterministic=True)`, `magnet serve --deterministic`): exactly its solo `engine.generate([prompt], **same settings)`
  tokens, whatever its batchmates, their number, their arrival order and (CPU) the thread count, in fp32, fp16 and bf16.
  Every linear is row-invariant by construction (`LM.invariant_linear`); attention runs per request over its own frames
  and text (`LM.forward_packed`: no padding but a folded text's own masked padding, the same alone); the sampler
  reduces over V within a position; requests in lockstep share one re-mask and span scoring whose ops are exact
  wherever a row sits (`magnet.lockstep`); each request draws its noise, before its first step, from its own
  generator (`row_generators(seed, 1)`), in the solo run's order.
  tests/test_determinism.py and tests/test_scheduler.py hold it (bench/gpu.sh runs the former on CUDA in fp16 and
  bf16).
- Otherwise (the default on CUDA; `deterministic=False` / `--no-deterministic` on CPU): the GEMMs' kernels depend
  on the pass's row count, so a logit moves by ~1e-5 (CPU, fp32) to ~1e-4 (CUDA, fp16) with the batchmates and a
  near-tie can flip; the same seed alone still gives the same tokens.

Threads: the loop thread does all torch work (text encoding, LM, sampling, codec, and a caller's `render`);
`submit` does none. With libgomp (torch's OpenMP on Linux), every OpenMP thread pool counts against the CPUs: once
the pools of two threads (a caller that loaded the model, and the loop thread) hold more threads than there are
CPUs, libgomp stops letting idle workers spin and every parallel op pays a sleep/wake-up, ~1.5-2x slower in both
threads. So the constructor, which runs in the caller's thread, hands that thread's OpenMP workers back
(`release_openmp_threads`, OpenMP 5.0 `omp_pause_resource_all`) before the loop thread starts: `Scheduler(engine)`
with an engine loaded on the caller's thread is then as fast as `Scheduler(lambda: magnet_engine.load(...))` (a loader
still keeps every torch call in one thread). A caller that runs torch again later gets a pool again. Likewise the
loop thread hands its own workers back whenever it goes idle, so torch work in other threads between bursts (a
caller's own, a static batch a benchmark interleaves) runs unthrottled; the next burst spawns them again (~0.1 ms).

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

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

from .config import SettingError, check_real
from .core import Core
from .lifecycle import Job, RequestTimeout, Status, Stream, resolve
from .longform import is_long
from .magnet import Decoding, output_frames
from .policy import Limits, Plan, refusal, schedule, stream_refusal
from .request import Request
from .results import Generation, join

if TYPE_CHECKING:
    from .api import Engine
    from .config import GenerationConfig
    from .results import Chunk

__all__ = ["QueueFull", "RequestTimeout", "Scheduler", "SchedulerClosed", "Stream", "default_max_frames",
           "release_openmp_threads", "start_request"]


class QueueFull(RuntimeError):
    """`Scheduler.submit` past `max_queue` waiting requests: retry later or raise max_queue."""


class SchedulerClosed(RuntimeError):
    """Work handed to a Scheduler after `close()`."""


def _check_timeout(timeout: Any) -> float | None:
    """A SettingError naming <timeout>, as every front end spells it."""
    if timeout is None:
        return None
    return check_real("timeout", timeout, low=0.0, above=True, hint=" seconds (or omit it)")


class Collected(Stream):
    """A long piece submitted with `submit`: its chunks are joined into the Generation its future resolves to."""

    def __init__(self, request: Request, deadline: float | None, future: Future[Generation], sample_rate: int,
                 render: Callable[[Generation], Any] | None = None) -> None:
        super().__init__(request, deadline)
        self.future, self.sample_rate, self.parts, self.render_whole = future, sample_rate, [], render

    def put(self, item: Chunk | BaseException | None) -> None:
        if isinstance(item, BaseException):
            self.future.set_exception(item)
        elif item is None:
            resolve(self.future, join(self.parts, self.sample_rate, self.request.gen.seed), self.render_whole)
        else:
            self.parts.append(item)


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


def pass_frames(gen: GenerationConfig, engine: Engine) -> int:
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

    A thin shell: the caller's threads put requests in (`submit`, `stream`: validated once into a `Request`, held as a
    `lifecycle.Job` or `Stream`); the loop thread asks `policy.schedule` for each iteration's plan under the lock and
    has `core.Core` carry it out outside it.
    """

    def __init__(self, engine: Engine | Callable[[], Engine], max_batch: int = 8, max_queue: int = 64,
                 max_frames: int | None = None, max_streams: int = 4) -> None:
        """`engine`: a loaded Engine, or a function that loads one, called in the loop thread (all torch work in one
        thread); its errors are raised here. `max_frames` None: `default_max_frames`. `max_streams`: streamed
        requests held at once (started or waiting)."""
        self.limits = Limits(max_batch, max_queue, max_frames, max_streams)
        self.max_batch, self.max_queue, self.max_streams = max_batch, max_queue, max_streams
        self._jobs: list[Job] = []  # in arrival order, until they finish; the list is changed under the lock
        self._streams: list[Stream] = []  # streamed requests, one decoding step per loop iteration each
        self._cv = threading.Condition()
        self._closed = False
        self._cancel_pending = False
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

    @property
    def max_frames(self) -> int | None:
        """The LM-pass budget (sized from the model once loaded when none was given: `default_max_frames`)."""
        return self.limits.max_frames

    @property
    def batch_sizes(self) -> Any:
        """iteration -> how many requests it decoded (for benchmarks); written by the loop thread only."""
        return self._core.batch_sizes

    @staticmethod
    def check_limits(max_batch: int, max_queue: int, max_frames: int | None = None, max_streams: int = 1) -> None:
        """A SettingError naming the first bad limit; front ends (magnet serve) call it before loading a model."""
        Limits(max_batch, max_queue, max_frames, max_streams)

    def _run(self, engine: Engine | Callable[[], Engine], ready: list[BaseException | None],
             started: threading.Event) -> None:
        try:
            eng = engine() if callable(engine) else engine
            _check_engine(eng)
            self.engine = eng
            self._core = Core(eng)
            if self.limits.max_frames is None:
                self.limits = Limits(self.max_batch, self.max_queue, default_max_frames(eng, self.max_batch),
                                     self.max_streams)
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
                jobs, streams, self._jobs, self._streams = self._jobs, self._streams, [], []
            for st in streams:
                if not st.status.finished:
                    st.end(RuntimeError(f"the scheduler's loop failed: {e!r}"))
            for job in jobs:
                if not job.status.finished:
                    job.fail(RuntimeError(f"the scheduler's loop failed: {e!r}"))
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
        except (ValueError, TypeError) as e:
            future.set_exception(e)
            return future
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        if is_long(self.engine.config, request.gen):  # window by window beside the batch (`stream`), joined at the end
            future.set_running_or_notify_cancel()
            self._add_stream(Collected(request, deadline, future, self.engine.sample_rate, render))
            return future
        job = Job(request, future, now, deadline, pass_frames(request.gen, self.engine), render)
        with self._cv:
            self._check_open()
            if (why := refusal(self._jobs, self.limits)) is not None:
                raise QueueFull(why)
            self._jobs.append(job)
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
            if (why := stream_refusal(self._streams, self.limits)) is not None:
                raise QueueFull(why)
            self._streams.append(stream)
            self._cv.notify()

    def _check_open(self) -> None:
        if self._closed:
            raise SchedulerClosed("the scheduler is closed: submit before close() or start a new one")

    def counts(self) -> tuple[int, int]:
        """(waiting, decoding) requests now, streams included, for metrics and health; racy by design (no lock)."""
        jobs, streams = list(self._jobs), list(self._streams)
        waiting = sum(j.status in (Status.WAITING, Status.ADMITTED) for j in jobs)
        waiting += sum(s.status is Status.WAITING for s in streams)
        decoding = sum(j.status in (Status.RUNNING, Status.DECODED) for j in jobs)
        return waiting, decoding + sum(s.status is Status.STREAMING for s in streams)

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
        """schedule (under the lock) -> execute (outside it) -> drop what finished, until closed and drained."""
        worked = False
        with torch.no_grad():
            while True:
                with self._cv:
                    while (plan := self._plan()).idle:
                        if worked:  # idle: its OpenMP workers go back, so other threads' torch is not throttled
                            release_openmp_threads()
                            worked = False
                        self._cv.wait()
                    if plan.stop:
                        return
                    for job in plan.admit:
                        job.admit()
                self._core.execute(plan)
                worked = True
                with self._cv:
                    self._jobs = [j for j in self._jobs if not j.status.finished]
                    self._streams = [s for s in self._streams if not s.status.finished]

    def _plan(self) -> Plan:
        return schedule(self._jobs, self._streams, self.limits, time.monotonic(), closed=self._closed,
                        cancel_pending=self._cancel_pending)


def start_request(eng: Engine, prompt: str | None, gen: GenerationConfig) -> Decoding:
    """`Engine.start` of a one-prompt request whose settings were checked already (`Engine.settings`); new code
    builds the request with `Engine.request`."""
    return eng.start(Request(eng.config, (prompt,), gen))
