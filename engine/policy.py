"""The scheduler's policy, pure: the requests' statuses and the limits in, a `Plan` for one loop iteration out (vLLM
v1's `Scheduler.schedule()`). No threads, no torch, no clock of its own: the caller passes `now`.

The rules (each one a function below, `schedule` applies them in order):
- Admission is FIFO: the head of the queue takes a batch slot while fewer than `max_batch` requests hold one and
  the LM pass's frames stay within `max_frames` (a request alone always fits); nobody overtakes a request that
  waits for room.
- Beside a running batch, at most one admitted request starts (its text encoding) and one decoded request finishes
  (its codec call) per iteration, so a burst delays the batch by one text or codec call per step; an idle loop does
  all of it at once.
- Deadlines: a queued request past its deadline times out without starting, a running one mid-decoding, one that
  reaches its start past it times out there. A stream past its deadline, or cancelled by its consumer, ends.
- Closing with `cancel_pending`: queued requests are cancelled, streams not yet started fail.
- Refusal at submit time (`refusal`): when the batch's free slots and `max_queue` are both used up (requests held
  against max_batch + max_queue), or `max_streams` streams are held.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .config import check_int
from .lifecycle import HELD, Status


class Job(Protocol):
    """What the policy reads of a request (engine.lifecycle.Job)."""

    status: Status
    deadline: float | None
    frames: int  # its share of an LM pass (rows x frames)


class Stream(Protocol):
    """What the policy reads of a streamed request (engine.lifecycle.Stream)."""

    status: Status
    deadline: float | None

    @property
    def cancelled(self) -> bool: ...


@dataclass(frozen=True)
class Limits:
    max_batch: int = 8  # requests holding a batch slot (admitted or running)
    max_queue: int = 64  # requests waiting beside a full batch
    max_frames: int | None = None  # LM-pass frames of the running and admitted requests (None: no budget)
    max_streams: int = 4  # streamed requests held (started or waiting)

    def __post_init__(self) -> None:
        """A SettingError naming the first bad limit."""
        check_int("max_batch", self.max_batch, low=1)
        check_int("max_queue", self.max_queue, low=0)
        if self.max_frames is not None:
            check_int("max_frames", self.max_frames, low=1)
        check_int("max_streams", self.max_streams, low=0)


@dataclass
class Plan:
    """One loop iteration: the engine core (`engine.core.execute`) carries it out in this order."""

    cancel: list[Job] = field(default_factory=list)  # queued, dropped by close(cancel_pending)
    admit: list[Job] = field(default_factory=list)  # WAITING -> ADMITTED: a batch slot each
    start: list[Job] = field(default_factory=list)  # ADMITTED -> RUNNING: text encoding, decoding state
    finish: list[Job] = field(default_factory=list)  # DECODED -> FINISHED: the codec call
    expire: list[Job] = field(default_factory=list)  # queued, starting or running requests past their deadline
    run: list[Job] = field(default_factory=list)  # RUNNING requests that take this iteration's step (the started
    # ones join them once their text is encoded)
    end_streams: list[tuple[Stream, Status, str]] = field(default_factory=list)  # streams ending now: how, why
    advance: list[Stream] = field(default_factory=list)  # streams that take one step (the first starts them)
    stop: bool = False  # closed and nothing left: the loop returns

    @property
    def idle(self) -> bool:
        """Nothing to do: the loop waits for work."""
        return not (self.cancel or self.admit or self.start or self.finish or self.expire or self.run
                    or self.end_streams or self.advance or self.stop)


def refusal(jobs: Sequence[Job], limits: Limits) -> str | None:
    """Why a new request is refused now (QueueFull's message), or None: the batch's free slots and max_queue are
    used up (requests waiting, admitted and running, against max_batch + max_queue)."""
    held = sum(j.status in HELD for j in jobs)
    if held < limits.max_batch + limits.max_queue:
        return None
    waiting = sum(j.status is Status.WAITING for j in jobs)
    return (f"{waiting} requests are waiting beside a full batch of {limits.max_batch} (max_queue="
            f"{limits.max_queue}); retry later or create the Scheduler with a larger max_queue")


def stream_refusal(streams: Sequence[Stream], limits: Limits) -> str | None:
    """Why a new stream is refused now, or None (the streams held: started or waiting, not ended)."""
    streams = [s for s in streams if not s.status.finished]
    if len(streams) < limits.max_streams:
        return None
    return (f"{len(streams)} streamed requests are running or waiting (max_streams={limits.max_streams}); retry "
            "later or create the Scheduler with a larger max_streams")


def admit(jobs: Sequence[Job], limits: Limits) -> list[Job]:
    """The waiting requests (in arrival order) that take a batch slot now: FIFO within max_batch and max_frames."""
    holding = [j for j in jobs if j.status in (Status.ADMITTED, Status.RUNNING)]
    slots = limits.max_batch - len(holding)
    frames = sum(j.frames for j in holding)
    admitted: list[Job] = []
    for job in (j for j in jobs if j.status is Status.WAITING):
        if len(admitted) >= slots:
            break
        if frames and limits.max_frames is not None and frames + job.frames > limits.max_frames:
            break  # FIFO: nobody overtakes it
        frames += job.frames
        admitted.append(job)
    return admitted


def late(deadline: float | None, now: float) -> bool:
    return deadline is not None and now >= deadline


def schedule(jobs: Sequence[Job], streams: Sequence[Stream], limits: Limits, now: float, *, closed: bool = False,
             cancel_pending: bool = False) -> Plan:
    """The plan of one iteration for `jobs` (in arrival order; terminal ones ignored) and `streams` at time `now`."""
    plan = Plan()
    jobs = [j for j in jobs if not j.status.finished]
    if cancel_pending:
        plan.cancel = [j for j in jobs if j.status is Status.WAITING]
        plan.end_streams = [(s, Status.FAILED, "the scheduler closed before the stream started") for s in streams
                            if s.status is Status.WAITING]
        jobs = [j for j in jobs if j.status is not Status.WAITING]
    ending = {id(s) for s, _, _ in plan.end_streams}
    streams = [s for s in streams if id(s) not in ending]
    if closed and not jobs and not streams:
        plan.stop = True
        return plan
    plan.admit = admit(jobs, limits)
    admitted = {id(j) for j in plan.admit}
    running = [j for j in jobs if j.status is Status.RUNNING]
    starting = [j for j in jobs if j.status is Status.ADMITTED or id(j) in admitted]
    decoded = [j for j in jobs if j.status is Status.DECODED]
    busy = bool(running)  # beside a running batch: one text encoding and one codec call per step
    plan.start = starting[:1] if busy else starting
    plan.finish = decoded[:1] if busy else decoded
    queued = [j for j in jobs if j.status is Status.WAITING and id(j) not in admitted]
    plan.expire = [j for j in [*queued, *plan.start, *running] if late(j.deadline, now)]
    expired = {id(j) for j in plan.expire}
    plan.start = [j for j in plan.start if id(j) not in expired]
    plan.run = [j for j in running if id(j) not in expired]
    for s in streams:
        if s.cancelled:
            plan.end_streams.append((s, Status.CANCELLED, "the stream was cancelled"))
        elif late(s.deadline, now):
            plan.end_streams.append((s, Status.TIMED_OUT, "the streamed request did not finish within its timeout"))
        else:
            plan.advance.append(s)
    return plan
