"""The engine core's execution step (vLLM v1's `EngineCore.step`: schedule -> execute -> update): one iteration's
`policy.Plan` carried out on an Engine, each request's status (`engine.lifecycle`) updated as it goes.

    plan ─► cancel / end streams ─► start (Engine.start: text encoding, decoding state) ─► finish (codec, render)
         ─► expire ─► ONE `magnet.decode_step` over every running request (one packed LM pass, `Engine.lm_pass`)
         ─► the finished ones become DECODED ─► one step of each stream (`Engine.stream_steps`)

Every failure is its request's own: a failed text encoding, codec call or render fails its future; a failed LM pass
is retried request by request (`retry_alone`). Capture errors never reach here: a captured pass whose capture fails
runs eagerly inside `GraphedPass` (engine.api). Runs in the scheduler's loop thread, which holds no lock meanwhile.
"""
from __future__ import annotations

import collections
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .lifecycle import Job, RequestTimeout, Status, Stream
from .magnet import decode_step
from .policy import Plan
from .results import Generation

if TYPE_CHECKING:
    import torch

    from .api import Engine

log = logging.getLogger("magnet_engine.engine.scheduler")

_END = object()  # a stream's steps have run out


class Core:
    """One engine and the counters of its steps; `execute(plan)` runs one iteration."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # iteration -> how many requests it decoded (for benchmarks)
        self.batch_sizes: collections.Counter[int] = collections.Counter()

    def execute(self, plan: Plan) -> None:
        for job in plan.cancel:
            job.cancel()
        for st, status, why in plan.end_streams:
            error = RequestTimeout(why) if status is Status.TIMED_OUT else RuntimeError(why)
            st.end(error, status)
        self.start(plan.start)
        self.finish_all(plan.finish)
        for job in plan.expire:
            self.expire(job)
        # the running requests, then those that started now (in admission order)
        running = [j for j in (*plan.run, *plan.start) if j.status is Status.RUNNING]
        if running:
            self.step(running)
        for st in plan.advance:
            self.advance(st)

    def start(self, jobs: Sequence[Job]) -> None:
        """ADMITTED -> RUNNING: their text encoding and decoding state, together (`Engine.start_many`: one batched
        product per folded text length, each request's program its own start's); when that fails, each alone, so
        that a request's own error fails only it and the loop goes on."""
        jobs = [job for job in jobs if job.begin()]  # the others were cancelled by their callers while queued
        now = time.monotonic()
        if len(jobs) > 1:
            try:
                decs = self.engine.start_many([job.request for job in jobs])
            except Exception:  # noqa: BLE001 - whose error it is shows when each starts alone, below
                pass
            else:
                for job, dec in zip(jobs, decs):
                    job.run(dec, now)
                return
        for job in jobs:
            try:
                dec = self.engine.start(job.request)
            except Exception as e:  # noqa: BLE001 - any failure belongs to this request's future, the loop goes on
                job.fail(e)
                continue
            job.run(dec, now)

    def expire(self, job: Job) -> None:
        """A request past its deadline leaves: queued or starting ones without starting, running ones mid-decoding."""
        if job.status is Status.RUNNING:
            assert job.dec is not None and job.deadline is not None
            job.fail(RequestTimeout(
                f"the request did not finish within its timeout ({job.deadline - job.submitted:.3g} s); it was at "
                f"step {job.dec.done} of {job.dec.total}"))
        else:
            job.fail(RequestTimeout("the request timed out in the queue before it started"))

    def step(self, running: Sequence[Job]) -> None:
        """One decoding step of every running request: one LM pass, one sampler call per length; the finished ones
        become DECODED (their codec runs in a later iteration: policy)."""
        self.batch_sizes[len(running)] += 1
        marks = [j.dec.done for j in running]
        try:
            decode_step(self.engine.lm_pass, self.engine.sample, [j.dec for j in running])
        except Exception as e:  # noqa: BLE001 - the pass touched every running request: retry them one by one
            self.retry_alone(running, marks, e)
        for job in running:
            if job.status is Status.RUNNING and job.dec.finished:
                job.decoded()

    def retry_alone(self, running: Sequence[Job], marks: Sequence[int], error: Exception) -> None:
        """After a failed pass: each request it did not advance runs this step again alone, with the same pre-drawn
        noise (`prepare` is idempotent: it re-masks from the same scores), so its tokens stay those of its solo run; a
        request that fails alone fails, the others go on. One request alone: nothing to retry."""
        if len(running) == 1:
            running[0].fail(error)
            return
        log.warning("magnet scheduler: a pass of %d requests failed (%r); retrying each alone", len(running), error)
        for job, done in zip(running, marks):
            if job.dec.done != done:  # its step completed before the failure
                continue
            try:
                decode_step(self.engine.lm_pass, self.engine.sample, [job.dec])
            except Exception as e:  # noqa: BLE001 - this request fails alone: it is the failing one
                job.fail(e)

    def finish_all(self, jobs: Sequence[Job]) -> None:
        """Several DECODED requests (a burst finishing together): their codec calls batched (`Engine.decode_many`);
        when the batched call fails, each request decodes alone, so a codec failure stays its own request's."""
        if len(jobs) < 2:
            for job in jobs:
                self.finish(job)
            return
        try:
            audios: Sequence[torch.Tensor | None] = self.engine.decode_many([j.dec.codes for j in jobs])
        except Exception:  # noqa: BLE001 - retried request by request below, where a failure is its request's
            audios = [None] * len(jobs)
        for job, audio in zip(jobs, audios):
            self.finish(job, audio)

    def finish(self, job: Job, audio: torch.Tensor | None = None) -> None:
        """DECODED -> FINISHED: codec decoding (unless `audio` is given: `finish_all`) and the caller's render."""
        try:
            if audio is None:
                audio = self.engine.decode(job.dec.codes)
        except Exception as e:  # noqa: BLE001 - a codec failure is this request's
            job.fail(e)
            return
        done = time.monotonic()
        stats = {"queue_s": job.started - job.submitted, "latency_s": done - job.submitted}
        job.finish(Generation(audio=audio, codes=job.dec.codes, sample_rate=self.engine.sample_rate,
                              seed=job.request.gen.seed, stats=stats))

    def advance(self, st: Stream) -> None:
        """One decoding step of a streamed request (its first call starts it; `Engine.stream_steps`), a chunk when
        it completes a window; its end or failure ends the stream."""
        try:
            if st.chunks is None:
                st.chunks = self.engine.stream_steps(st.request)
                st.status = Status.STREAMING
            item = next(st.chunks, _END)
            if item is None:
                return  # a step of the piece, between two of the batch's
            if item is _END:
                st.end(None)
                return
            st.put(item if st.render is None else st.render(item))
        except Exception as e:  # noqa: BLE001 - a failure of this piece is its own, the loop goes on
            st.end(e)
