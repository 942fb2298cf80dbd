"""Hybrid-MAGNeT (paper, arXiv 2401.04577, §3.3 / abstract): the first seconds are generated autoregressively, the
rest is decoded by MAGNeT in parallel with that prefix fixed.

    AR model (KV-cached `generate_tokens_ar`, its own text encoder, defaults and guidance):  frames 0 .. P−1
    MAGNeT continuation (`generate_tokens(prompt=prefix)`): the prefix is fixed in all K codebooks, frames P .. T'−1

P = round(hybrid_prefix · frame_rate) must be in [1, T'), T' = MAGNeT's output frames. The AR part follows the
request's `greedy` flag and `ar_cfg` (else the AR model's own defaults: MusicGen temperature 1, top-k 250, cfg 3),
draws its noise from the request's generator first, and continues an audio prompt when one is given.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from .magnet import Progress, output_frames
from .musicgen import DelayPattern, generate_tokens_ar
from .rescore import StepTimer, check_companion

if TYPE_CHECKING:
    from .api import Engine
    from .config import GenerationConfig


def prefix_frames(main: Engine, gen: GenerationConfig) -> int:
    """P: the hybrid prefix in frames, checked against MAGNeT's output length T'."""
    p = int(round(gen.hybrid_prefix * main.config.frame_rate))
    t = output_frames(main.config, gen)
    if p < 1:
        raise ValueError(f"hybrid prefix {gen.hybrid_prefix}s is shorter than one frame "
                         f"(1/{main.config.frame_rate}s); use 0 to turn the hybrid off")
    if p >= t:
        raise ValueError(f"hybrid prefix {gen.hybrid_prefix}s ({p} frames) must be shorter than the generation "
                         f"({t} frames = {t / main.config.frame_rate}s); lower --hybrid-prefix or raise --duration")
    return p


def ar_settings(ar: Engine, gen: GenerationConfig, frames: int) -> GenerationConfig:
    """The AR model's own defaults for `frames` frames, with the request's greedy flag and AR guidance."""
    base = ar.default_generation()
    cfg = (gen.ar_cfg,) if gen.ar_cfg is not None else base.cfg
    return dataclasses.replace(base, greedy=gen.greedy or base.greedy, cfg=cfg,
                               duration=frames / ar.config.frame_rate, seed=None)


def ar_steps(ar: Engine, frames: int, prompt_frames: int) -> int:
    """AR decoding steps for `frames` frames after a `prompt_frames` prompt (for progress totals)."""
    pattern = DelayPattern(ar.config.delays, frames)
    return pattern.steps - pattern.first_step(prompt_frames)


@torch.no_grad()
def generate_prefix(main: Engine, ar: Engine, prompts: list[str | None], gen: GenerationConfig,
                    prompt: torch.Tensor | None, generator: torch.Generator | None,
                    progress: Progress | None = None) -> tuple[torch.Tensor, StepTimer]:
    """-> (prefix codes [B, K, P] int64 from the AR model, its timer: read it after the whole request, as reading
    it on CUDA waits for the prefix). `prompt` [B, K, p] (p < P) is continued."""
    check_companion(main, ar, "AR model")
    assert ar.lm is not None  # check_companion refuses an AR engine without its torch LM
    p = prefix_frames(main, gen)
    if prompt is not None and prompt.shape[-1] >= p:
        raise ValueError(f"the audio prompt ({prompt.shape[-1]} frames) already covers the hybrid prefix ({p} "
                         "frames); drop --hybrid-prefix or make it longer than the prompt")
    ar_gen = ar_settings(ar, gen, p)
    ar_gen.check_for(ar.config)
    timer = StepTimer(main.device)
    timer.start()
    cond = ar.text(prompts)  # the AR model's own text conditioning
    prefix = generate_tokens_ar(ar.lm, cond, ar_gen, len(prompts), ar.device, prompt, generator, progress,
                                sample=ar.sample)
    timer.stop()
    return prefix, timer


def check_request(main: Engine, gen: GenerationConfig, rescorer: Engine | None, ar_model: Engine | None,
                  explicit: set[str]) -> None:
    """Refuse combinations that would be silently ignored or cannot work, before any model runs.
    `explicit`: the GenerationConfig fields the caller passed as keywords."""
    if rescorer is None and "rescore_weight" in explicit:
        raise ValueError("rescore_weight is used only with a rescorer: pass rescorer=<MusicGen Engine> "
                         "(CLI: --rescorer MODEL)")
    if rescorer is None and ar_model is None and "ar_cfg" in explicit:
        raise ValueError("ar_cfg is the guidance of a rescorer or hybrid AR model: pass rescorer= or ar_model= "
                         "(CLI: --rescorer / --ar-model)")
    if gen.hybrid_prefix > 0 and ar_model is None:
        raise ValueError("hybrid_prefix needs the AR model that writes the prefix: pass ar_model=<MusicGen Engine> "
                         "(CLI: --ar-model MODEL)")
    if ar_model is not None and gen.hybrid_prefix <= 0:
        raise ValueError("ar_model is used only by the hybrid: also pass hybrid_prefix=SECONDS "
                         "(CLI: --hybrid-prefix SECONDS)")
    if rescorer is not None:
        check_companion(main, rescorer, "rescorer")
    if ar_model is not None:
        check_companion(main, ar_model, "AR model")
        prefix_frames(main, gen)


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
