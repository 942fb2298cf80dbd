"""MAGNeT's decoding: codebook stages one after another, each filled in parallel over a few mask-predict steps.

One step exists once (`decode_step`): re-mask → LM pass → guidance and sampling → span scores. It advances one
request alone (`stepping`: the plain run, long-form windows, the quality levers) or many at once (the scheduler)
through the same code, behind two interfaces a backend provides: `Step` (one request's LM pass, from its text) with
a `Pass` that runs several requests' steps together, and `Sampler` (`engine.sampling.sample_ref` or a Triton kernel).

A request's decoding is a static program (`Decoding`), fixed by its shape (rows, frames, steps, guided, span
arrangement, sampling mode, dtype, device) before the first step:
- every buffer (codes, the codebook row being filled, span scores) is allocated up front and updated in place;
- the noise of every step is drawn before the loop, from each row's own generator in its solo order;
- the schedule (spans to re-mask, guidance and temperature per step) and the sampler's parameters are device
  tensors;
- re-masking and span scoring are fixed-shape device ops (a rank comparison against the step's count).
Inside the loop nothing reads the device (no .item(), .tolist(), nonzero) and nothing branches on data, so the whole
program can be captured once as a CUDA graph (engine.graph) and compiled whole by torch.compile.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch

from .config import GenerationConfig, ModelConfig, frame_multiple, output_frames  # noqa: F401 - re-exported
from .masking import DONT_REMASK, chunk_frames, chunk_mask, chunk_scores, least_probable_spans, stage_schedule
from .sampling import RowParams, StepSampling, row_tensors

Progress = Callable[[int, int], None]


class Step(Protocol):
    def __call__(self, codes: torch.Tensor, stage: int, guided: bool, frames: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """codes [B, K, T] -> (cond, uncond) logits of codebook `stage`, each [B, T, V], or [B, n, V] at `frames`
        [B, n] (int64, in index order: the frames the step samples; `pick_frames` gives them from all T).
        guided=False: only the conditional rows run and cond is returned twice (the sampler's guidance then gives
        cond exactly)."""
        ...


class Pass(Protocol):
    def __call__(self, decs: Sequence[Decoding]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One LM pass of several requests, each at its own stage (`prepare()` done): their (cond, uncond) logits
        at the frames each samples (`Decoding.sampled_logits`), each request's as its own `step` gives them."""
        ...


def each_alone(decs: Sequence[Decoding]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The `Pass` of a backend that cannot batch requests (onnxruntime: one text length per call): each its own."""
    return [d.step(d.codes, d.stage, d.guided, d.index) for d in decs]


def pick_frames(x: torch.Tensor, frames: torch.Tensor | None) -> torch.Tensor:
    """x [B, T, ..] -> [B, n, ..] at frames [B, n] (None: x itself): for a `Step` that computes every frame."""
    if frames is None:
        return x
    b, t = x.shape[:2]
    flat = (frames + torch.arange(0, b * t, t, device=x.device)[:, None]).flatten()  # [B·n] rows of [B·T]
    return x.flatten(0, 1).index_select(0, flat).view(*frames.shape, *x.shape[2:])


def step_rows(codes: torch.Tensor, guided: bool) -> torch.Tensor:
    """codes [B, K, T] -> the rows a step's LM pass runs: [cond; uncond] = [2B, K, T] when guided, else [B, K, T]."""
    return torch.cat([codes, codes]) if guided else codes


def split_rows(logits: torch.Tensor, guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The pass's logits [2B or B, T, V] -> (cond, uncond) [B, T, V] each; unguided: cond twice (see `Step`)."""
    return logits.chunk(2) if guided else (logits, logits)


class Sampler(Protocol):
    def __call__(self, cond: torch.Tensor, uncond: torch.Tensor, current: torch.Tensor, mask_id: int,
                 params: StepSampling | RowParams, uniform: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        ...


class Rescore(Protocol):
    def __call__(self, codes: torch.Tensor, stage: int) -> torch.Tensor:
        """codes [B, K, T] after a step's sampling -> p_ar [B, T] fp32: each token of codebook `stage` under an
        external (autoregressive) model. Must not synchronise with the host (see engine.rescore.ARRescorer)."""
        ...


def row_generators(seed: int | None, batch: int, device: torch.device) -> list[torch.Generator] | None:
    """One generator per prompt: row b draws its noise from seed + b, so a prompt's draws do not depend on how many
    prompts share its call (the scheduler gives each request its own; a solo run is row 0 of seed)."""
    if seed is None:
        return None
    return [torch.Generator(device=device).manual_seed(seed + b) for b in range(batch)]


def draw_noise(steps: int, batch: int, frames: int, device: torch.device,
               generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    """Every step's uniform noise [S, B, T] fp32, drawn before the loop: row b's from its own generator as one
    [S, T] draw, which on CPU is the draws each step made of its own [T] in step order (so a request's tokens do not
    depend on when its noise is drawn, nor on its batchmates)."""
    if generators is None:
        return torch.rand(steps, batch, frames, device=device)
    rows = torch.empty(batch, steps, frames, device=device)
    for b, g in enumerate(generators):
        # one launch per row: on CPU one [S, T] draw is bit for bit S draws of [T] (tests/test_capture.py); on CUDA
        # this one draw is the rule (Philox offsets depend on the launch)
        rows[b].uniform_(generator=g)
    return rows.transpose(0, 1).contiguous()  # [S, B, T]: a step's noise is one contiguous [B, T]


def to_device(rows: Sequence[Sequence[float]], device: torch.device) -> torch.Tensor:
    """Equal-length rows of host numbers -> one fp32 device tensor [R, n], through pinned memory with one
    non-blocking copy (no sync with the device)."""
    host = torch.tensor(rows, dtype=torch.float32)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


class Decoding:
    """One request's MAGNeT decoding as a static program, advanced one step at a time (vLLM style) so a scheduler
    can interleave many requests in one LM pass per step; `stepping` drives one alone through the same code.

    A step is `prepare()` (re-mask this step's spans -> the codes [B, K, T] the LM pass reads at `stage`, with or
    without the unconditional half as `guided` says), the LM pass (`step`, or a `Pass` over several requests) and the
    sampler with `params()` and `noise()`, then `advance(tokens, probs)` (span scores for the next step). The host
    only counts steps: which stage and which schedule entry a step uses is known before the loop (module docstring).
    """

    def __init__(self, model: ModelConfig, gen: GenerationConfig, batch: int, device: torch.device,
                 prompt: torch.Tensor | None = None, generators: Sequence[torch.Generator] | None = None,
                 rescore: Rescore | None = None, step: Step | None = None) -> None:
        self.model, self.gen, self.batch, self.device, self.rescore = model, gen, batch, device, rescore
        self.step = step  # this request's LM pass (its text's cross-attention bound in), for `Pass`es
        self.frames = t = output_frames(model, gen)
        self.n_prompt = p = 0 if prompt is None else prompt.shape[-1]
        if p >= t:
            raise ValueError(f"the audio prompt ({p} frames) must be shorter than the generation ({t} frames)")
        if generators is not None and len(generators) != batch:
            raise ValueError(f"{len(generators)} generators for {batch} rows: give one per row")
        span, card = model.span_len, model.card
        self.mask_id = card
        self.chunked = gen.span_arrangement == "nonoverlap" or span == 1  # span 1: tokens are their own chunks
        self.guided = gen.guided  # a setting, not data: fixed for the whole request
        # the static sequence of steps: (stage, its step index), in order
        self.order = [(stage, i) for stage, n in enumerate(gen.steps) for i in range(n)]
        self.total, self.done = len(self.order), 0

        # buffers, allocated once
        self.codes = torch.full((batch, model.n_q, t), card, dtype=torch.long, device=device)  # [B, K, T]
        if prompt is not None:
            self.codes[..., :p] = prompt
        self.prompt_codes = self.codes.clone() if p else None  # [B, K, T]: the prompt, re-imposed after masking
        self.prompt_frames = torch.arange(t, device=device) < p  # [T] bool
        self.row = torch.full((batch, t), card, dtype=torch.long, device=device)  # codebook `stage`, [B, T]
        n_prompt, n_scores = (p // span, t // span) if self.chunked else (p, t)
        self.first_scores = torch.zeros(batch, n_scores, device=device)  # a stage's scores before its first step
        self.first_scores[:, :n_prompt] = DONT_REMASK
        self.scores = self.first_scores.clone()  # [B, C]: chunks (nonoverlap) or frames (stride1)
        self.chunks = torch.zeros(batch, n_scores, dtype=torch.bool, device=device)  # this step's re-masked chunks

        # the schedule, as device tensors indexed by the step
        plans = [plan for n in gen.steps for plan in stage_schedule(n, n_scores - n_prompt, gen.cfg_max, gen.cfg_min,
                                                                     gen.temperature, gen.anneal_temp)]
        # one pinned host buffer, one non-blocking copy: no sync between other requests' passes (the scheduler
        # builds a request while others decode). fp32 holds the counts (< 2^24) exactly.
        n_mask, cfg, temp = to_device([[plan.n_mask for plan in plans], [plan.cfg_coef for plan in plans],
                                       [plan.temperature for plan in plans]], device)  # [S] each
        self.n_mask = n_mask.long()
        base = row_tensors(StepSampling(0.0, 1.0, gen.top_k, gen.top_p, gen.greedy), batch, device)
        # [S, B], materialised: a sampler reads row b's value at offset b (kernels take contiguous [B] rows)
        self.cfg, self.temperature = cfg[:, None].repeat(1, batch), temp[:, None].repeat(1, batch)
        self.step_params = [RowParams(c, tp, base.top_k, base.top_p, base.mode, base.modes, base.k_max)
                            for c, tp in zip(self.cfg.unbind(0), self.temperature.unbind(0))]
        self.uniform = None if gen.greedy else draw_noise(self.total, batch, t, device, generators)  # [S, B, T]
        # On a CPU a nonoverlap step samples only the frames of the chunks it re-masks: every masked frame is in
        # one, and the rest keep their tokens and have their scores overwritten (`advance`). Their count, n_mask
        # chunks of every row, is known before the loop, so this needs no host sync; other devices sample all T
        # frames (one shape for every step of a captured program).
        self.sampled_chunks = [plan.n_mask for plan in plans] if self.chunked and device.type == "cpu" else None
        self.row_starts = torch.arange(0, batch * t, t, device=device)[:, None]  # [B, 1] each row's start in [B·T]
        self.index: torch.Tensor | None = None  # [B, n] this step's sampled frames, in order (None: all T)
        self.flat_index: torch.Tensor | None = None  # [B·n] the same in [B·T] (index_select is ~10x gather's speed)
        # lockstep (`join`): the joined program this request's state lives in (None: its own buffers), and for a
        # joined one its members with their rows
        self.cohort: Decoding | None = None
        self.members: list[tuple[Decoding, slice]] = []
        self.own = {name: getattr(self, name) for name in _STATE}  # the buffers a member returns to (`leave`)

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    def shape_key(self) -> tuple:
        """What fixes this program's operations (not its numbers): requests with equal keys can replay one captured
        program (engine.graph) after `inputs()` are copied in."""
        gen = self.gen
        return (self.batch, self.frames, self.n_prompt, self.model.n_q, gen.steps, self.guided, self.chunked,
                gen.span_scoring, self.step_params[0].modes, self.step_params[0].k_max, self.rescore is not None,
                str(self.device))

    def inputs(self) -> list[torch.Tensor]:
        """The tensors that hold this request's numbers (its prompt, schedule, parameters, noise), in a fixed order:
        copied into a captured program's own (`engine.graph`), they make it this request's program. Everything else
        a step reads is reset at its stage's first step."""
        base = self.step_params[0]
        out = [self.codes, self.first_scores, self.n_mask, self.cfg, self.temperature, base.top_k, base.top_p,
               base.mode]
        return out + [t for t in (self.prompt_codes, self.uniform) if t is not None]

    @property
    def stage(self) -> int:
        """The codebook this step fills."""
        return self.order[min(self.done, self.total - 1)][0]

    def prepare(self) -> torch.Tensor:
        """Re-mask the spans this step re-decodes; -> codes [B, K, T] for the LM pass (codebook `stage` updated)."""
        assert not self.finished, "prepare() after the last step"
        s, (stage, i) = self.done, self.order[self.done]
        if i == 0:  # a stage starts from all-masked frames and flat scores (the prompt's fixed)
            self.row.fill_(self.mask_id)
            self.scores.copy_(self.first_scores)
        if self.chunked:
            chunks, remask = chunk_mask(self.scores, self.n_mask[s], self.model.span_len)
            self.chunks.copy_(chunks)
            if self.sampled_chunks is not None:
                self.index = chunk_frames(chunks, self.sampled_chunks[s], self.model.span_len)
                self.flat_index = (self.index + self.row_starts).flatten()
                for member, rows in self.members:  # (a joined program) each member's frames, for its LM pass
                    member.index, member.flat_index = self.index[rows], None
        else:
            remask = least_probable_spans(self.scores, self.n_mask[s], self.model.span_len)
        self.row.masked_fill_(remask, self.mask_id)
        if self.prompt_codes is not None:
            torch.where(self.prompt_frames, self.prompt_codes[:, stage], self.row, out=self.row)
        self.codes[:, stage] = self.row
        return self.codes

    def params(self) -> RowParams:
        """This step's sampling parameters (device tensors, built before the loop)."""
        return self.step_params[self.done]

    def noise(self) -> torch.Tensor | None:
        """This step's uniform noise [B, T] (None when greedy), drawn before the loop."""
        return None if self.uniform is None else self.uniform[self.done]

    @property
    def width(self) -> int:
        """How many frames of each row this step samples (after `prepare()`)."""
        return self.frames if self.index is None else self.index.shape[1]

    def sampled(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T] or [B, T, V] -> its frames this step samples: [B, width] or [B, width, V]."""
        if self.index is None:
            return x
        if self.flat_index is None:  # a member of a joined program, sampled alone (its frames came from the join)
            self.flat_index = (self.index + self.row_starts).flatten()
        return x.flatten(0, 1).index_select(0, self.flat_index).view(*self.index.shape, *x.shape[2:])

    def sampled_logits(self, cond: torch.Tensor, uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A pass's (cond, uncond) logits of every frame [B, T, V] -> at the frames this step samples (unguided: cond
        twice, one gather)."""
        cond_s = self.sampled(cond)
        return cond_s, cond_s if uncond is cond else self.sampled(uncond)

    def spread(self, tokens: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampler's tokens and probabilities [B, width] -> [B, T] for `advance`: the frames not sampled keep
        their tokens, and their probability (never read: their scores are DONT_REMASK) is 1."""
        if self.index is None:
            return tokens, probs
        return (self.row.scatter(1, self.index, tokens),
                torch.ones(self.row.shape, device=probs.device).scatter_(1, self.index, probs))

    def advance(self, tokens: torch.Tensor, probs: torch.Tensor) -> None:
        """The sampler's tokens [B, T] (written where masked) and chosen probabilities [B, T] -> the next step."""
        stage, i = self.order[self.done]
        last = i == self.gen.steps[stage] - 1
        masked = None if self.chunked else self.row == self.mask_id  # stride1 scores only the frames sampled now
        self.row.copy_(tokens)
        self.codes[:, stage] = tokens
        if self.rescore is not None and not last:  # a setting, not data; the last step's scores are never read
            w = self.gen.rescore_weight
            probs = w * probs + (1.0 - w) * self.rescore(self.codes, stage)  # [B, T]
        if self.chunked:
            self.scores.copy_(chunk_scores(probs, self.model.span_len, self.gen.span_scoring).masked_fill(
                ~self.chunks, DONT_REMASK))
        else:
            self.scores.copy_((-torch.log(probs)).masked_fill(~masked, DONT_REMASK))
        self.done += 1
        for member, _ in self.members:
            member.done = self.done

    @property
    def joinable(self) -> bool:
        """Whether this request's re-mask, sampler inputs and span scores may run joined with other requests'
        (`join`), each row still getting its solo bits: true of the chunked 'max' scoring (ranks, fills, max and
        1 - p are exact wherever a row sits). Not of −log p ('prod' scoring, stride1): on a CPU a vectorised log and
        the scalar one of a loop's tail round differently, and which elements fall in the tail depends on the rows
        before them. Nor with a rescorer (its own state per request)."""
        return self.chunked and self.gen.span_scoring == "max" and self.rescore is None

    @classmethod
    def join(cls, members: Sequence[Decoding]) -> Decoding:
        """Requests in lockstep (`joinable`, equal `shape_key` and step) as one program over all their rows, vLLM's
        persistent batch: its prepare, sampler inputs and advance run once for all of them, not once each. Their
        state is copied into its buffers and each member's state becomes a view of its rows, so a member still
        reads its codes, frames and step, and can run alone (a retry); `leave` hands it back. The LM pass still
        runs per member (each has its own text)."""
        first = members[0]
        key = (first.shape_key(), first.done)
        assert len(members) > 1 and all(m.joinable and (m.shape_key(), m.done) == key for m in members), \
            "join takes joinable requests of one shape at one step"
        joined = copy.copy(first)  # the settings all share: schedule, counts, order, shape
        joined.batch = sum(m.batch for m in members)
        joined.step, joined.rescore, joined.cohort = None, None, None
        for name in (*_STATE, "first_scores"):
            setattr(joined, name, torch.cat([getattr(m, name) for m in members]))
        joined.prompt_codes = None if first.prompt_codes is None else torch.cat([m.prompt_codes for m in members])
        joined.cfg = torch.cat([m.cfg for m in members], dim=1)
        joined.temperature = torch.cat([m.temperature for m in members], dim=1)
        joined.step_params = [RowParams.concat([m.step_params[s] for m in members]) for s in range(first.total)]
        joined.uniform = None if first.uniform is None else torch.cat([m.uniform for m in members], dim=1)
        joined.row_starts = torch.arange(0, joined.batch * first.frames, first.frames, device=first.device)[:, None]
        joined.own, joined.members, joined.index, joined.flat_index = {}, [], None, None
        start = 0
        for m in members:
            rows = slice(start, start + m.batch)
            for name in _STATE:
                setattr(m, name, getattr(joined, name)[rows])
            m.cohort = joined
            joined.members.append((m, rows))
            start += m.batch
        return joined

    def leave(self, carry: bool = True) -> None:
        """A member of a joined program back on its own buffers, with the state it has reached (`carry`) or with
        what they hold (a program about to start over from its inputs: `run_together`)."""
        if self.cohort is None:
            return
        for name, own in self.own.items():
            if carry:
                own.copy_(getattr(self, name))
            setattr(self, name, own)
        self.cohort = None


# A request's decoding state that a step changes (`Decoding.join` shares it)
_STATE = ("codes", "row", "scores", "chunks")


def lockstep(decs: Sequence[Decoding]) -> list[Decoding]:
    """The programs a step prepares, samples and advances for `decs`: requests in lockstep (`Decoding.joinable`,
    equal shape and step) as one joined program (`Decoding.join`, reused while they stay together), the others
    each alone; in order of their first request."""
    if len(decs) < 2:
        return list(decs)
    groups: dict[object, list[Decoding]] = {}
    for d in decs:
        groups.setdefault((d.shape_key(), d.done) if d.joinable else id(d), []).append(d)
    units = []
    for group in groups.values():
        if len(group) == 1:
            group[0].leave()
            units.append(group[0])
            continue
        cohort = group[0].cohort
        same = (cohort is not None and cohort.done == group[0].done and len(cohort.members) == len(group)
                and all(m is d for (m, _), d in zip(cohort.members, group)))
        units.append(cohort if same else Decoding.join(group))
    return units


def decode_step(lm_pass: Pass, sample: Sampler, decs: Sequence[Decoding]) -> None:
    """One decoding step of every request in `decs`, whatever stage and step each is at: re-mask, one LM pass
    (`lm_pass`), one sampler call per group of requests sampling equally many frames (no padded position: the
    sampler costs as much as the LM on small models) with each row's own parameters and noise, span scores.
    Requests in lockstep are re-masked, gathered and scored as one joined program (`lockstep`), so that host work
    does not grow with their number. Each request's numbers are those of its solo run: the pass and the sampler are
    row-invariant (the sampler works position by position), the joined steps are exact (`Decoding.joinable`), and
    noise and parameters are its own."""
    units = lockstep(decs)
    for u in units:
        u.prepare()
    logits = lm_pass(decs)  # each request's at the frames it samples
    if len(decs) == 1:
        (d,), ((cond, uncond),) = decs, logits
        noise = d.noise()
        tokens, probs = sample(cond, uncond, d.sampled(d.row), d.mask_id, d.params(),
                               None if noise is None else d.sampled(noise))
        d.advance(*d.spread(tokens, probs))
        if d.finished:  # a joined program's member that ran its last step alone (a retry): its own buffers back
            d.leave()
        return
    place = {id(d): i for i, d in enumerate(decs)}
    groups: dict[int, list[Decoding]] = {}
    for u in units:
        groups.setdefault(u.width, []).append(u)
    for group in groups.values():
        own = [logits[place[id(m)]] for u in group for m in ([m for m, _ in u.members] or [u])]
        cond = _cat([lg[0] for lg in own])  # [R, width, V]
        # unguided requests' uncond is their cond (`Step`): one copy, not two, when the whole group is unguided
        uncond = cond if all(lg[1] is lg[0] for lg in own) else _cat([lg[1] for lg in own])
        noise = [u.noise() for u in group]
        uniform = None
        if any(n is not None for n in noise):  # a greedy row's noise is never read: zeros
            uniform = _cat([u.sampled(n) if n is not None else torch.zeros(u.batch, u.width, device=u.device)
                            for n, u in zip(noise, group)])
        params = RowParams.concat([u.params() for u in group])
        current = _cat([u.sampled(u.row) for u in group])
        tokens, probs = sample(cond, uncond, current, group[0].mask_id, params, uniform)
        start = 0
        for u in group:
            u.advance(*u.spread(tokens[start:start + u.batch], probs[start:start + u.batch]))
            start += u.batch
    for u in units:
        if u.finished:  # its members' codes back in their own buffers (a captured program returns those)
            for m, _ in u.members:
                m.leave()


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def stepping(dec: Decoding, sample: Sampler, progress: Progress | None = None) -> Iterator[None]:
    """One request's remaining steps alone, yielding after each, so a caller can interleave other work between
    them (the scheduler advances a streamed piece this way beside its batch)."""
    while not dec.finished:
        decode_step(each_alone, sample, [dec])
        if progress is not None:
            progress(dec.done, dec.total)
        yield


def run_together(lm_pass: Pass, sample: Sampler, decs: Sequence[Decoding]) -> None:
    """Every step of requests that start together, from their first, one `decode_step` per step over those not
    finished (which leave, and when, is known from their settings before the loop). One request through
    `each_alone` is a request's whole program; either way the unit a CUDA graph captures (engine.graph): the host
    only counts steps."""
    for d in decs:
        d.leave(carry=False)  # from its first step: its own buffers hold its inputs
        d.done = 0
    while live := [d for d in decs if not d.finished]:
        decode_step(lm_pass, sample, live)  # a request leaves its joined program as it finishes
