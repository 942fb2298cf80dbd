"""engine.policy on its own: statuses and limits in, one iteration's plan out; no threads, no torch, no model."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
from magnet_engine.engine.lifecycle import Status
from magnet_engine.engine.policy import Limits, admit, refusal, schedule, stream_refusal


@dataclass(eq=False)
class J:
    frames: int = 10
    status: Status = Status.WAITING
    deadline: float | None = None


@dataclass(eq=False)
class S:
    status: Status = Status.WAITING
    deadline: float | None = None
    cancelled: bool = False


def jobs(*statuses: Status, frames: int = 10) -> list[J]:
    return [J(frames, s) for s in statuses]


W, A, R, D = Status.WAITING, Status.ADMITTED, Status.RUNNING, Status.DECODED


def test_admission_is_fifo_up_to_max_batch():
    queue = jobs(R, W, W, W)
    plan = schedule(queue, [], Limits(max_batch=3), now=0.0)
    assert plan.admit == queue[1:3] and plan.run == queue[:1]


def test_nobody_overtakes_a_request_waiting_for_frames():
    """The head does not fit the frame budget: it waits, and the smaller one behind it waits too (FIFO)."""
    queue = [J(60, R), J(50), J(5)]
    assert admit(queue, Limits(max_batch=8, max_frames=100)) == []
    assert admit(queue, Limits(max_batch=8, max_frames=110)) == queue[1:2]
    assert admit(queue, Limits(max_batch=8, max_frames=115)) == queue[1:]


def test_a_request_alone_always_runs_whatever_its_frames():
    big = J(1000)
    assert admit([big], Limits(max_batch=2, max_frames=10)) == [big]


def test_admitted_and_running_hold_the_slots():
    queue = jobs(A, R, W)
    assert admit(queue, Limits(max_batch=2)) == []
    assert admit(queue, Limits(max_batch=3)) == queue[2:]


def test_idle_loop_starts_and_finishes_everything_at_once():
    queue = jobs(W, W, W, D, D)
    plan = schedule(queue, [], Limits(max_batch=8), now=0.0)
    assert plan.start == queue[:3] and plan.finish == queue[3:]


def test_beside_a_running_batch_one_start_and_one_finish_per_step():
    """Fairness to the batch: a burst of arrivals or completions costs it one text and one codec call per step."""
    queue = jobs(R, A, W, W, D, D)
    plan = schedule(queue, [], Limits(max_batch=8), now=0.0)
    assert plan.admit == queue[2:4]  # they take their slots now, and start one per step
    assert plan.start == queue[1:2] and plan.finish == queue[4:5] and plan.run == queue[:1]


def test_refused_only_when_free_slots_and_queue_are_used_up():
    limits = Limits(max_batch=4, max_queue=0)
    assert refusal(jobs(W, W, W), limits) is None  # a burst of max_batch into an idle scheduler is taken whole
    assert "max_queue=0" in refusal(jobs(W, W, W, W), limits)
    assert refusal(jobs(R, R, D, D, W), Limits(max_batch=2, max_queue=2)) is None  # decoded ones hold no slot
    assert refusal(jobs(R, R, W, W), Limits(max_batch=2, max_queue=2)) is not None


def test_streams_have_their_own_limit():
    limits = Limits(max_streams=2)
    assert stream_refusal([S(), S(Status.STREAMING)], limits) is not None
    assert stream_refusal([S(), S(Status.FINISHED)], limits) is None  # an ended stream holds nothing
    assert stream_refusal([], Limits(max_streams=0)) is not None


def test_deadlines():
    """Queued and running requests past their deadline leave; one reaching its start past it times out there; an
    admitted one that does not start this step is not looked at; a request without deadline never expires."""
    queued, starting, running, later, waiting_slot, free = (J(deadline=1.0), J(status=A, deadline=1.0),
                                                            J(status=R, deadline=1.0), J(status=R, deadline=9.0),
                                                            J(status=A, deadline=1.0), J(status=R))
    plan = schedule([running, later, free, starting, waiting_slot, queued], [], Limits(max_batch=5), now=2.0)
    assert set(map(id, plan.expire)) == {id(queued), id(starting), id(running)}
    assert plan.run == [later, free] and plan.start == []  # busy: only `starting` would start, and it expired


def test_streams_end_when_cancelled_or_late_and_step_otherwise():
    gone, late, fine = S(Status.STREAMING, cancelled=True), S(deadline=1.0), S(Status.STREAMING, deadline=5.0)
    plan = schedule([], [gone, late, fine], Limits(), now=2.0)
    assert [(s, st) for s, st, _ in plan.end_streams] == [(gone, Status.CANCELLED), (late, Status.TIMED_OUT)]
    assert plan.advance == [fine]


def test_close():
    """Closing with cancel_pending drops the queue and the streams not started; closed and drained: stop."""
    queue, st, started = jobs(R, W, W), S(), S(Status.STREAMING)
    plan = schedule(queue, [st, started], Limits(max_batch=8), now=0.0, closed=True, cancel_pending=True)
    assert plan.cancel == queue[1:] and plan.admit == [] and plan.run == queue[:1]
    assert [s for s, _, _ in plan.end_streams] == [st] and plan.advance == [started]
    assert schedule(jobs(Status.FINISHED), [], Limits(), now=0.0, closed=True).stop
    assert not schedule(queue, [], Limits(), now=0.0, closed=True).stop  # closed: what is queued still runs
    assert schedule([], [], Limits(), now=0.0).idle


def test_limits_are_checked():
    with pytest.raises(ValueError, match="max_batch"):
        Limits(max_batch=0)
    with pytest.raises(ValueError, match="max_frames"):
        Limits(max_frames=0)
