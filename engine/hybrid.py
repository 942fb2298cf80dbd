"""Hybrid-MAGNeT (paper, arXiv 2401.04577, §3.3 / abstract): the first seconds are generated autoregressively, the
rest is decoded by MAGNeT in parallel with that prefix fixed.

    AR model (KV-cached `generate_tokens_ar`, its own text encoder, defaults and guidance):  frames 0 .. P−1
    MAGNeT continuation (a `magnet.Decoding` with the prefix as its prompt): fixed in all K codebooks, frames P .. T'−1

P = round(hybrid_prefix · frame_rate) must be in [1, T'), T' = MAGNeT's output frames. The AR part follows the
request's `greedy` flag and `ar_cfg` (else the AR model's own defaults: MusicGen temperature 1, top-k 250, cfg 3),
draws its noise from the request's generator first, and continues an audio prompt when one is given.
"""
from __future__ import annotations

import dataclasses

import torch

from .config import GenerationConfig, ModelConfig, SettingError
from .magnet import Progress, output_frames
from .musicgen import ARCompanion, DelayPattern, generate_tokens_ar
from .rescore import StepTimer


def prefix_frames(model: ModelConfig, gen: GenerationConfig) -> int:
    """P: the hybrid prefix in frames, checked against MAGNeT's output length T'."""
    p = int(round(gen.hybrid_prefix * model.frame_rate))
    t = output_frames(model, gen)
    if p < 1:
        raise SettingError(f"<hybrid_prefix> {gen.hybrid_prefix:g}s is shorter than one frame "
                           f"(1/{model.frame_rate}s); use 0 to turn the hybrid off")
    if p >= t:
        raise SettingError(f"<hybrid_prefix> {gen.hybrid_prefix:g}s ({p} frames) must be shorter than the "
                           f"generation ({t} frames = {t / model.frame_rate:g}s); lower <hybrid_prefix> or raise "
                           "<duration>")
    return p


def ar_settings(ar: ARCompanion, gen: GenerationConfig, frames: int) -> GenerationConfig:
    """The AR model's own defaults for `frames` frames, with the request's greedy flag and AR guidance."""
    base = ar.defaults
    cfg = (gen.ar_cfg,) if gen.ar_cfg is not None else base.cfg
    return dataclasses.replace(base, greedy=gen.greedy or base.greedy, cfg=cfg,
                               duration=frames / ar.config.frame_rate, seed=None)


def ar_steps(ar: ARCompanion, frames: int, prompt_frames: int) -> int:
    """AR decoding steps for `frames` frames after a `prompt_frames` prompt (for progress totals)."""
    pattern = DelayPattern(ar.config.delays, frames)
    return pattern.steps - pattern.first_step(prompt_frames)


@torch.no_grad()
def generate_prefix(model: ModelConfig, ar: ARCompanion, prompts: list[str | None], gen: GenerationConfig,
                    prompt: torch.Tensor | None, generator: torch.Generator | None,
                    progress: Progress | None = None) -> tuple[torch.Tensor, StepTimer]:
    """-> (prefix codes [B, K, P] int64 from the AR model, its timer: read it after the whole request, as reading
    it on CUDA waits for the prefix). `prompt` [B, K, p] (p < P) is continued. The request was checked when built
    (engine.request): the AR model fits `model`."""
    p = prefix_frames(model, gen)
    if prompt is not None and prompt.shape[-1] >= p:
        raise SettingError(f"the audio prompt ({prompt.shape[-1]} frames) already covers the hybrid prefix ({p} "
                           "frames); drop <hybrid_prefix> or make it longer than the prompt")
    ar_gen = ar_settings(ar, gen, p)
    ar_gen.check_for(ar.config)
    timer = StepTimer(ar.device)
    timer.start()
    cond = ar.text(prompts)  # the AR model's own text conditioning
    prefix = generate_tokens_ar(ar.lm, cond, ar_gen, len(prompts), ar.device, prompt, generator, progress,
                                sample=ar.sample)
    timer.stop()
    return prefix, timer


def split_progress(progress: Progress | None, first: int, second: int
                   ) -> tuple[Progress | None, Progress | None]:
    """One progress callback over two loops of `first` then `second` steps -> a callback for each loop."""
    if progress is None:
        return None, None
    total = first + second

    def one(done: int, _: int) -> None:
        progress(done, total)

    def two(done: int, _: int) -> None:
        progress(first + done, total)

    return one, two
