"""MusicGen's autoregressive decoding loop: one frame of all K codebooks per step under the delay pattern, causal
self-attention over a preallocated KV cache (audiocraft `LMModel.generate` in streaming mode, reproduced).

Delay pattern (audiocraft `DelayedPatternProvider`, `empty_initial=0`), delays (0, 1, 2, 3), T frames:

    step s      0   1   2   3   4  ...  T+3        S = T + max_delay + 1 steps
    codebook 0  ·   t0  t1  t2  t3 ...  ·          codebook k at step s holds frame s - 1 - delay[k]
    codebook 1  ·   ·   t0  t1  t2 ...  ·          · = special token `card` (step 0 is all special)
    codebook 3  ·   ·   ·   ·   t0 ...  t(T-1)

Step s feeds the column at s - 1 (position s - 1, the streaming offset) and samples column s from the last
position's logits, guided `uncond + (cond - uncond) * cfg` over the 2B rows [cond; uncond]. Cells outside the
frame range stay special, prompt cells stay as given; only unknown cells take the sampled token.

The step function (`ARDecoder.step`) has static shapes: the caches are [2B, H, T_max, D] with T_max = S - 1 fixed,
k/v are written in place at a position held in a device tensor, and attention always spans the whole cache under a
`key <= position` mask. So the loop never synchronises with the host, and on CUDA the whole frame loop is captured
once per shape as one CUDA graph (mode "program", `engine.graph.Captured`) and replayed per request.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .config import GenerationConfig, ModelConfig
from .graph import Captured, ProgramCache
from .magnet import Progress, Sampler
from .model import LM, CrossKV
from .sampling import GREEDY, RowParams, StepSampling, row_tensors, sample_ref

UNKNOWN = -1  # a pattern cell not generated yet (audiocraft's `unknown_token`)

StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ARCompanion:
    """What the quality levers (engine.rescore, engine.hybrid) need of an autoregressive model: its LM for the
    causal, KV-cached path, its own text conditioning (prompts -> [B, L, dim]), its decoding defaults and sampler,
    and where it runs. `Engine.companion()` makes one from a loaded MusicGen engine."""

    config: ModelConfig
    lm: LM
    text: Callable[[Sequence[str | None]], torch.Tensor]
    defaults: GenerationConfig
    sample: Sampler
    device: torch.device
    sample_rate: int


@dataclass(frozen=True)
class DelayPattern:
    """The delay interleaving for T frames, as index maps computed on the host once per request."""

    delays: tuple[int, ...]
    frames: int  # T

    @property
    def steps(self) -> int:
        """S: sequence columns, including the leading all-special one."""
        return self.frames + max(self.delays) + 1

    def first_step(self, frame: int) -> int:
        """The first column holding `frame` in some codebook (audiocraft `get_first_step_with_timesteps`)."""
        return frame + 1 + min(self.delays)

    def _frame_index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (frame [K, S] of each cell, clamped into [0, T); valid [K, S] bool: the cell holds a real frame)."""
        s = torch.arange(self.steps, device=device)
        t = s[None, :] - 1 - torch.tensor(self.delays, device=device)[:, None]  # [K, S]
        valid = (t >= 0) & (t < self.frames)
        return t.clamp(0, self.frames - 1), valid

    def build(self, codes: torch.Tensor, special: int) -> torch.Tensor:
        """codes [B, K, T] -> sequence [B, K, S]; cells outside the frame range hold `special`."""
        t, valid = self._frame_index(codes.device)
        seq = codes.gather(2, t.expand(codes.shape[0], -1, -1))
        return torch.where(valid, seq, torch.full_like(seq, special))

    def revert(self, seq: torch.Tensor) -> torch.Tensor:
        """sequence [B, K, S] -> codes [B, K, T]: frame t of codebook k sits at column t + 1 + delay[k]."""
        cols = torch.arange(self.frames, device=seq.device)[None, :] + 1
        cols = cols + torch.tensor(self.delays, device=seq.device)[:, None]  # [K, T]
        return seq.gather(2, cols.expand(seq.shape[0], -1, -1))


class ARDecoder:
    """One request's decoding state: a static KV cache per layer and the text's cross-attention k/v.

    Rows are [cond; uncond] (N = 2B); the unconditional half's text is the null condition, whose cross-attention
    is exactly zero, so `cross` holds k/v for the first B rows only (`Layer.cross` skips the rest).
    """

    def __init__(self, lm: LM, cross: CrossKV, batch: int, max_len: int) -> None:
        cfg = lm.cfg
        device = lm.linears[0].weight.device
        self.lm, self.cross, self.batch, self.max_len = lm, cross, batch, max_len
        shape = (2 * batch, cfg.num_heads, max_len, cfg.head_dim)
        # [2B, H, T_max, D] per layer, zero-filled: masked keys must hold finite values (0·inf would give NaN)
        self.caches = [(torch.zeros(shape, dtype=lm.dtype, device=device),
                        torch.zeros(shape, dtype=lm.dtype, device=device)) for _ in lm.layers]
        self.key_pos = torch.arange(max_len, device=device)  # [T_max]

    def step(self, tokens: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, K, n] at positions pos .. pos + n - 1 (pos: int64 tensor, 0-d or [1], on the device)
        -> (cond, uncond) logits [B, K, V] fp32 of the last position. Writes k/v of those positions into the cache.

        n = 1 is the per-frame step (static shapes, graph-capturable); n > 1 is the prefill of an audio prompt.
        """
        lm = self.lm
        n = tokens.shape[-1]
        index = pos.reshape(1) + torch.arange(n, device=tokens.device)  # [n]
        mask = self.key_pos[None, :] <= index[:, None]  # [n, T_max]: causal over the cache
        x = lm.forward_cached(tokens, index, self.cross, self.caches, mask)  # [2B, n, dim]
        h = lm.out_norm(x[:, -1].float())  # [2B, dim]
        logits = torch.stack([lin(h) for lin in lm.linears], dim=1)  # [2B, K, V]
        return logits[: self.batch], logits[self.batch:]


def sampling_params(gen: GenerationConfig) -> StepSampling:
    """Constant guidance cfg[0]; temperature 0 means argmax, as in the reference (`use_sampling and temp > 0`)."""
    greedy = gen.greedy or gen.temperature <= 0.0
    temperature = gen.temperature if gen.temperature > 0.0 else 1.0  # unused by argmax, kept finite
    return StepSampling(cfg_coef=gen.cfg_max, temperature=temperature, top_k=gen.top_k, top_p=gen.top_p,
                        greedy=greedy)


@torch.no_grad()
def generate_tokens_ar(lm: LM, cond: torch.Tensor, gen: GenerationConfig, batch: int, device: torch.device,
                       prompt: torch.Tensor | None = None, generator: torch.Generator | None = None,
                       progress: Progress | None = None, sample: Sampler = sample_ref,
                       mode: Literal["eager", "program"] = "eager",
                       programs: ProgramCache | None = None) -> torch.Tensor:
    """MusicGen generation -> codes [B, K, T] int64, T = gen.frames(model) including the prompt.

    cond: text embeddings [B, L, dim] (after `text_proj`, padding zeroed); prompt [B, K, P] fixes the first P
    frames (continuation, P < T). Random draws: one uniform per (step, row, codebook) from `generator`, drawn
    up front. `sample` is the engine's sampler (`sample_ref` semantics). `mode` "eager" runs the frame loop step by
    step; "program" captures the whole loop once per shape as one CUDA graph in `programs` (engine.graph).
    """
    model: ModelConfig = lm.cfg
    if model.kind != "musicgen" or len(model.delays) != model.n_q:
        raise ValueError(f"the AR loop needs a musicgen model with {model.n_q} delays, got kind {model.kind!r}")
    k, special = model.n_q, model.card
    t = gen.frames(model)
    p = 0 if prompt is None else prompt.shape[-1]
    if p >= t:
        raise ValueError(f"the audio prompt ({p} frames) must be shorter than the generation ({t} frames)")
    pattern = DelayPattern(model.delays, t)
    codes = torch.full((batch, k, t), UNKNOWN, dtype=torch.long, device=device)
    if prompt is not None:
        codes[..., :p] = prompt
    seq = pattern.build(codes, special)  # [B, K, S]: special / prompt / UNKNOWN
    n_cols = pattern.steps
    start = pattern.first_step(p)  # first column to sample; columns before it are all known
    cross = lm.cross_kv(cond)
    params = row_tensors(sampling_params(gen), batch, device)  # [B] each: built once, read by every step
    n_steps = n_cols - start
    uniforms = None if params.modes == {GREEDY} else torch.rand(n_steps, batch, k, generator=generator,
                                                                 device=device)
    if mode == "program":
        if programs is None:
            raise ValueError("mode 'program' keeps its captured loops in a ProgramCache: pass programs=")
        key = ("ar", batch, t, start, tuple(cross[0][0].shape) if cross else (), params.modes, params.k_max)
        values = [seq, params.cfg_coef, params.temperature, params.top_k, params.top_p, params.mode,
                  *([] if uniforms is None else [uniforms]), *(x for kv in cross for x in kv)]

        def build() -> Captured[torch.Tensor]:
            static_cross = [(a.clone(), b.clone()) for a, b in cross]
            decoder = ARDecoder(lm, static_cross, batch, n_cols - 1)
            return Captured(lambda: _frame_loop(decoder, decoder.step, sample, seq, start, params, uniforms),
                            values[:len(values) - 2 * len(cross)] + [x for kv in static_cross for x in kv], device)

        def eager() -> torch.Tensor:  # the same loop, uncaptured (its capture failed)
            decoder = ARDecoder(lm, cross, batch, n_cols - 1)
            return _frame_loop(decoder, decoder.step, sample, seq, start, params, uniforms)

        out = programs.run(key, build, values, eager).clone()  # the program's buffers serve the next request
        if progress is not None:
            progress(n_steps, n_steps)
        return pattern.revert(out)
    if mode != "eager":
        raise ValueError(f"unknown mode {mode!r}: choose 'eager' or 'program'")
    decoder = ARDecoder(lm, cross, batch, n_cols - 1)
    return pattern.revert(_frame_loop(decoder, decoder.step, sample, seq, start, params, uniforms, progress))


def _frame_loop(decoder: ARDecoder, step: StepFn, sample: Sampler, seq: torch.Tensor, start: int, params: RowParams,
                uniforms: torch.Tensor | None, progress: Progress | None = None) -> torch.Tensor:
    """Columns start .. S-1 of seq [B, K, S] (UNKNOWN where sampled), one frame step each, in place -> seq. No host
    synchronisation and no data-dependent branch: the whole loop can be captured (mode "program")."""
    b, k, n_cols = seq.shape
    special = decoder.lm.cfg.card
    all_mask = torch.full((b, k), special, dtype=torch.long, device=seq.device)  # sampler fills every cell
    positions = torch.arange(n_cols, device=seq.device)  # on-device step counters: no host→device copy per step
    # prefill: columns 0 .. start-1 (just the special column without a prompt) at positions 0 .. start-1
    cond_logits, uncond_logits = decoder.step(seq[..., :start], positions[0])
    for i, col in enumerate(range(start, n_cols)):
        if i > 0:
            cond_logits, uncond_logits = step(seq[..., col - 1:col], positions[col - 1])
        uniform = None if uniforms is None else uniforms[i]
        sampled, _ = sample(cond_logits, uncond_logits, all_mask, special, params, uniform)  # [B, K]
        known = seq[..., col]
        seq[..., col] = torch.where(known == UNKNOWN, sampled, known)  # keep special and prompt cells
        if progress is not None:
            progress(i + 1, n_cols - start)
    return seq
