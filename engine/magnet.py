"""MAGNeT's decoding loop: codebook stages one after another, each filled in parallel over a few mask-predict steps.

One loop serves every backend: it only sees `Step` (codes -> cond/uncond logits of one codebook) and `Sampler`
(the fused guidance/temperature/sampling op, `engine.sampling.sample_ref` or a Triton kernel). The schedule is
computed on the host before the loop, so the loop never waits on the device (no .item(), no data-dependent
Python branches).
"""
from __future__ import annotations

from collections.abc import Callable
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
    """Frames returned: nonoverlap trims T to a multiple of the span (498 for 10 s), as the reference does."""
    t = gen.frames(model)
    if gen.span_arrangement == "nonoverlap" and model.span_len > 1:
        t -= t % model.span_len
    return t


@torch.no_grad()
def generate_tokens(step: Step, sample: Sampler, model: ModelConfig, gen: GenerationConfig, batch: int,
                    device: torch.device, prompt: torch.Tensor | None = None,
                    generator: torch.Generator | None = None, progress: Progress | None = None,
                    rescore: Rescore | None = None) -> torch.Tensor:
    """-> codes [B, K, T'] int64. `prompt` [B, K, P] fixes the first P frames of every codebook (continuation).

    `rescore` (paper §3.3): after each step's sampling, span scores use W·p_magnet + (1−W)·p_ar with
    W = gen.rescore_weight. Skipped at a stage's last step, whose scores nothing reads. W = 1 gives plain MAGNeT
    token for token (1·p + 0·p_ar == p exactly).
    """
    k, mask_id, span = model.n_q, model.card, model.span_len
    t = output_frames(model, gen)
    p = 0 if prompt is None else prompt.shape[-1]
    if p >= t:
        raise ValueError(f"the audio prompt ({p} frames) must be shorter than the generation ({t} frames)")
    codes = torch.full((batch, k, t), mask_id, dtype=torch.long, device=device)
    if prompt is not None:
        codes[..., :p] = prompt
    chunked = gen.span_arrangement == "nonoverlap" or span == 1  # span 1: tokens are their own chunks
    total, done = sum(gen.steps), 0
    guided = gen.guided  # a setting, not data: fixed for the whole request
    for stage, n_steps in enumerate(gen.steps):
        row = torch.full((batch, t), mask_id, dtype=torch.long, device=device)  # codebook `stage`, being filled
        if chunked:
            n_prompt = p // span
            scores = torch.zeros(batch, t // span, device=device)
            n_gen = t // span - n_prompt
        else:
            n_prompt = p
            scores = torch.zeros(batch, t, device=device)
            n_gen = t - p
        scores[:, :n_prompt] = DONT_REMASK
        plans = stage_schedule(n_steps, n_gen, gen.cfg_max, gen.cfg_min, gen.temperature, gen.anneal_temp)
        for i, plan in enumerate(plans):
            if chunked:
                chunks, remask = chunk_mask(scores, plan.n_mask, span)
            else:
                remask = least_probable_spans(scores, plan.n_mask, span)
            row = row.masked_fill(remask, mask_id)
            if prompt is not None:
                row[:, :p] = prompt[:, stage]
            codes[:, stage] = row
            cond, uncond = step(codes, stage, guided)
            uniform = None if gen.greedy else torch.rand(batch, t, generator=generator, device=device)
            params = StepSampling(plan.cfg_coef, plan.temperature, gen.top_k, gen.top_p, gen.greedy)
            masked = None if chunked else row == mask_id  # stride1 scores only the positions sampled now
            row, probs = sample(cond, uncond, row, mask_id, params, uniform)
            codes[:, stage] = row
            if rescore is not None and i < len(plans) - 1:  # host-side test: no sync
                w = gen.rescore_weight
                probs = w * probs + (1.0 - w) * rescore(codes, stage)  # [B, T]
            if chunked:
                scores = chunk_scores(probs, span, gen.span_scoring).masked_fill(~chunks, DONT_REMASK)
            else:
                scores = (-torch.log(probs)).masked_fill(~masked, DONT_REMASK)
            done += 1
            if progress is not None:
                progress(done, total)
    return codes
