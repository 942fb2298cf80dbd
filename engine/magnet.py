"""MAGNeT's decoding loop: codebook stages one after another, each filled in parallel over a few mask-predict steps.

One loop serves every backend: it only sees `Step` (codes -> cond/uncond logits of one codebook) and `Sampler`
(the fused guidance/temperature/sampling op, `engine.sampling.sample_ref` or a Triton kernel). The schedule is
computed on the host before the loop, so the loop never waits on the device (no .item(), no data-dependent
Python branches).

The loop is a state machine per request (`Decoding`: prepare -> LM pass -> sample -> advance), so the same code
decodes one call's batch (`generate_tokens`) or many requests interleaved step by step (engine.scheduler).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from .config import GenerationConfig, ModelConfig
from .masking import DONT_REMASK, chunk_mask, chunk_scores, least_probable_spans, stage_schedule
from .sampling import StepSampling

Progress = Callable[[int, int], None]


class Step(Protocol):
    def __call__(self, codes: torch.Tensor, stage: int, guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """codes [B, K, T] -> (cond, uncond) logits of codebook `stage`, each [B, T, V]. guided=False: only the
        conditional rows run and cond is returned twice (the sampler's guidance then gives cond exactly)."""
        ...


def step_rows(codes: torch.Tensor, guided: bool) -> torch.Tensor:
    """codes [B, K, T] -> the rows a step's LM pass runs: [cond; uncond] = [2B, K, T] when guided, else [B, K, T]."""
    return torch.cat([codes, codes]) if guided else codes


def split_rows(logits: torch.Tensor, guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The pass's logits [2B or B, T, V] -> (cond, uncond) [B, T, V] each; unguided: cond twice (see `Step`)."""
    return logits.chunk(2) if guided else (logits, logits)


class Sampler(Protocol):
    def __call__(self, cond: torch.Tensor, uncond: torch.Tensor, current: torch.Tensor, mask_id: int,
                 params: StepSampling, uniform: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        ...


class Rescore(Protocol):
    def __call__(self, codes: torch.Tensor, stage: int) -> torch.Tensor:
        """codes [B, K, T] after a step's sampling -> p_ar [B, T] fp32: each token of codebook `stage` under an
        external (autoregressive) model. Must not synchronise with the host (see engine.rescore.ARRescorer)."""
        ...


def output_frames(model: ModelConfig, gen: GenerationConfig) -> int:
    """Frames one segment's decoding returns: MAGNeT's nonoverlap trims T to a multiple of the span (498 for 10 s),
    as the reference does; the AR loop returns T."""
    t = gen.frames(model)
    return t - t % frame_multiple(model, gen)


def frame_multiple(model: ModelConfig, gen: GenerationConfig) -> int:
    """What a segment's output length is a multiple of: the span under MAGNeT's nonoverlap, else 1."""
    return model.span_len if model.kind == "magnet" and gen.span_arrangement == "nonoverlap" else 1


def row_generators(seed: int | None, batch: int, device: torch.device) -> list[torch.Generator] | None:
    """One generator per prompt: row b draws its noise from seed + b, so a prompt's draws do not depend on how many
    prompts share its call (the scheduler gives each request its own; a solo run is row 0 of seed)."""
    if seed is None:
        return None
    return [torch.Generator(device=device).manual_seed(seed + b) for b in range(batch)]


class Decoding:
    """One request's MAGNeT decoding as a state machine, advanced one step at a time (vLLM style), so a scheduler
    can interleave many requests in one LM pass per step; `generate_tokens` drives one alone through the same code.

    A step is: `prepare()` (re-mask this step's spans, -> the codes [B, K, T] the LM pass reads, at `stage`, with
    or without the unconditional half as `guided` says), the caller's LM pass and sampling with `params()` and
    `noise()`, then `advance(tokens, probs)` (span scores for the next step; next stage after the last step).
    Everything here is host-side bookkeeping or tensors of this request only; no device sync.
    """

    def __init__(self, model: ModelConfig, gen: GenerationConfig, batch: int, device: torch.device,
                 prompt: torch.Tensor | None = None, generators: Sequence[torch.Generator] | None = None,
                 rescore: Rescore | None = None) -> None:
        self.model, self.gen, self.batch, self.device, self.rescore = model, gen, batch, device, rescore
        self.frames = t = output_frames(model, gen)
        self.n_prompt = p = 0 if prompt is None else prompt.shape[-1]
        if p >= t:
            raise ValueError(f"the audio prompt ({p} frames) must be shorter than the generation ({t} frames)")
        if generators is not None and len(generators) != batch:
            raise ValueError(f"{len(generators)} generators for {batch} rows: give one per row")
        self.prompt, self.generators = prompt, generators
        self.codes = torch.full((batch, model.n_q, t), model.card, dtype=torch.long, device=device)
        if prompt is not None:
            self.codes[..., :p] = prompt
        # span 1: tokens are their own chunks
        self.chunked = gen.span_arrangement == "nonoverlap" or model.span_len == 1
        self.guided = gen.guided  # a setting, not data: fixed for the whole request
        self.total, self.done = sum(gen.steps), 0
        self.stage = -1
        self._next_stage()

    @property
    def finished(self) -> bool:
        return self.stage >= len(self.gen.steps)

    def _next_stage(self) -> None:
        self.stage += 1
        self.stage_step = 0  # index into this stage's plans
        if self.finished:
            return
        b, t, span, p = self.batch, self.frames, self.model.span_len, self.n_prompt
        self.row = torch.full((b, t), self.model.card, dtype=torch.long, device=self.device)  # codebook `stage`
        n_prompt, n_scores = (p // span, t // span) if self.chunked else (p, t)
        self.scores = torch.zeros(b, n_scores, device=self.device)
        self.scores[:, :n_prompt] = DONT_REMASK
        self.plans = stage_schedule(self.gen.steps[self.stage], n_scores - n_prompt, self.gen.cfg_max,
                                    self.gen.cfg_min, self.gen.temperature, self.gen.anneal_temp)

    def prepare(self) -> torch.Tensor:
        """Re-mask the spans this step re-decodes; -> codes [B, K, T] for the LM pass (codebook `stage` updated)."""
        assert not self.finished, "prepare() after the last step"
        plan, mask_id, span = self.plans[self.stage_step], self.model.card, self.model.span_len
        if self.chunked:
            self.chunks, remask = chunk_mask(self.scores, plan.n_mask, span)
        else:
            remask = least_probable_spans(self.scores, plan.n_mask, span)
        self.row = self.row.masked_fill(remask, mask_id)
        if self.prompt is not None:
            self.row[:, :self.n_prompt] = self.prompt[:, self.stage]
        self.codes[:, self.stage] = self.row
        return self.codes

    def params(self) -> StepSampling:
        plan, gen = self.plans[self.stage_step], self.gen
        return StepSampling(plan.cfg_coef, plan.temperature, gen.top_k, gen.top_p, gen.greedy)

    def noise(self) -> torch.Tensor | None:
        """This step's uniform noise [B, T] (None when greedy): row b from its own generator, in the solo order."""
        if self.gen.greedy:
            return None
        b, t = self.batch, self.frames
        if self.generators is None:
            return torch.rand(b, t, device=self.device)
        return torch.stack([torch.rand(t, generator=g, device=self.device) for g in self.generators])

    def advance(self, tokens: torch.Tensor, probs: torch.Tensor) -> None:
        """The sampler's tokens [B, T] (written where masked) and chosen probabilities [B, T] -> the next step."""
        masked = None if self.chunked else self.row == self.model.card  # stride1 scores only the positions sampled now
        self.row = tokens
        self.codes[:, self.stage] = tokens
        last = self.stage_step == len(self.plans) - 1
        if self.rescore is not None and not last:  # host-side test: no sync; the last step's scores are never read
            w = self.gen.rescore_weight
            probs = w * probs + (1.0 - w) * self.rescore(self.codes, self.stage)  # [B, T]
        if self.chunked:
            self.scores = chunk_scores(probs, self.model.span_len, self.gen.span_scoring).masked_fill(
                ~self.chunks, DONT_REMASK)
        else:
            self.scores = (-torch.log(probs)).masked_fill(~masked, DONT_REMASK)
        self.done += 1
        self.stage_step += 1
        if last:
            self._next_stage()


@torch.no_grad()
def generate_tokens(step: Step, sample: Sampler, model: ModelConfig, gen: GenerationConfig, batch: int,
                    device: torch.device, prompt: torch.Tensor | None = None,
                    generators: Sequence[torch.Generator] | None = None, progress: Progress | None = None,
                    rescore: Rescore | None = None) -> torch.Tensor:
    """-> codes [B, K, T'] int64. `prompt` [B, K, P] fixes the first P frames of every codebook (continuation).
    `generators`: one per row (`row_generators`), or None for torch's default generator.

    `rescore` (paper §3.3): after each step's sampling, span scores use W·p_magnet + (1−W)·p_ar with
    W = gen.rescore_weight. Skipped at a stage's last step, whose scores nothing reads. W = 1 gives plain MAGNeT
    token for token (1·p + 0·p_ar == p exactly).
    """
    dec = Decoding(model, gen, batch, device, prompt, generators, rescore)
    while not dec.finished:
        codes = dec.prepare()
        cond, uncond = step(codes, dec.stage, dec.guided)
        dec.advance(*sample(cond, uncond, dec.row, model.card, dec.params(), dec.noise()))
        if progress is not None:
            progress(dec.done, dec.total)
    return dec.codes
