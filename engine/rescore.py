"""Model rescoring (MAGNeT paper, arXiv 2401.04577, §3.3 "model rescoring"; Fig. 1): after each decoding step, an
external autoregressive model (MusicGen) scores the tokens MAGNeT just sampled, and the spans to re-mask are ranked
by the mixture

    p(token) = W · p_magnet(token) + (1 − W) · p_ar(token)          W = GenerationConfig.rescore_weight

The paper's body could not be read from here (only its abstract, Fig. 1's caption and summaries were retrievable);
the convex mixture follows the issue and W = 0.5 (config.DEFAULT_RESCORE_WEIGHT) is our choice, not the paper's.

p_ar comes from one teacher-forced, causal forward of the AR model over MAGNeT's current codes laid out in the AR
model's delay pattern (engine.musicgen.DelayPattern), under its own text conditioning and constant guidance:

    codes [B, K, T] ─ pattern.build (special = card) ─ columns 0 .. S−2 ─ causal prefill (ARDecoder caches) ─ h
    frame t of codebook k sits at column t + 1 + delay[k], so it is predicted from position t + delay[k]:
    h[:, delay[s] : delay[s] + T] ─ out_norm ─ head s ─ guided softmax (cfg, temperature 1) ─ gather token -> p_ar

While MAGNeT fills codebook s, codebooks > s hold its mask token; MAGNeT's mask id and MusicGen's special token are
both `card`, so the AR model reads them as "empty" cells (it never saw such cells mid-sequence in training; this is
the approximation rescoring a partial stage implies). Only the positions MAGNeT re-masks read p_ar.

The forward is the AR decoder's prefill (`LM.forward_cached` over a static cache sized S − 1, causal mask), the
very path `generate_tokens_ar` uses for audio prompts: no per-token loop, no host sync. Per-call wall time is kept
by `StepTimer` (CUDA events, read once after the loop; perf_counter on CPU, where kernels run synchronously).
"""
from __future__ import annotations

import time

import torch

from .config import GenerationConfig, ModelConfig
from .magnet import output_frames
from .musicgen import ARCompanion, ARDecoder, DelayPattern
from .sampling import guide


class StepTimer:
    """Wall time of calls made inside the decoding loop, without host syncs in the loop. CUDA: an event pair per
    call, resolved by `seconds()` after the loop (one sync there). CPU: perf_counter (CPU ops are synchronous)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._cpu: list[float] = []
        self._t0 = 0.0

    def start(self) -> None:
        if self.cuda:
            self._events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self._events[-1][0].record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self._events[-1][1].record()
        else:
            self._cpu.append(time.perf_counter() - self._t0)

    def seconds(self) -> list[float]:
        """Per-call seconds. On CUDA this waits for the last recorded event: call it after the loop."""
        if self.cuda:
            if self._events:
                self._events[-1][1].synchronize()
            return [a.elapsed_time(b) / 1000.0 for a, b in self._events]
        return list(self._cpu)


class ARRescorer:
    """One request's rescoring hook (`magnet.Rescore`): codes [B, K, T] and a stage -> p_ar [B, T] fp32.

    Built once per request: the AR model's text cross-attention k/v and a static KV cache [2B, H, S−1, D] per layer
    (rows [cond; uncond]), reused by every call.
    """

    def __init__(self, ar: ARCompanion, prompts: list[str | None], frames: int, cfg_coef: float) -> None:
        self.lm, self.cfg_coef, self.frames = ar.lm, cfg_coef, frames
        self.delays = ar.config.delays
        self.special = ar.config.card
        self.pattern = DelayPattern(self.delays, frames)
        cond = ar.text(prompts)  # [B, L, dim]: the AR model's own text encoder and projection
        # input columns 0 .. S-2: the last column is only ever a target
        self.decoder = ARDecoder(self.lm, self.lm.cross_kv(cond), len(prompts), self.pattern.steps - 1)
        self.timer = StepTimer(ar.device)
        # Host-built index maps, made once: `DelayPattern.build` copies its delays to the device on every call,
        # which on CUDA would be a host sync per MAGNeT step.
        k, device = len(self.delays), ar.device
        frames_idx = torch.arange(frames, device=device).expand(1, k, frames)
        frame_of = self.pattern.build(frames_idx, -1)[..., :-1]  # [1, K, S-1]: frame in each input cell, -1 = none
        self.valid = frame_of >= 0  # [1, K, S-1]
        self.gather_idx = frame_of.clamp(min=0)  # [1, K, S-1]
        pos = self.decoder.key_pos  # [S-1]
        self.causal = pos[None, :] <= pos[:, None]  # [S-1, S-1]

    @torch.no_grad()
    def hidden(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T] -> final-layer states [2B, S−1, dim] of input columns 0 .. S−2 (causal, teacher-forced).

        `ARDecoder.step`'s prefill without its last-position cut: every position's state is needed here.
        """
        lm, dec = self.lm, self.decoder
        seq = codes.gather(2, self.gather_idx.expand(codes.shape[0], -1, -1))  # [B, K, S-1]: pattern.build
        seq = seq.masked_fill(~self.valid, self.special)
        index = dec.key_pos  # [S-1]: positions 0 .. S-2 on the device
        return lm.forward_cached(seq, index, dec.cross, dec.caches, self.causal)  # [2B, S-1, dim]

    @torch.no_grad()
    def probs(self, codes: torch.Tensor, stage: int) -> torch.Tensor:
        """codes [B, K, T] -> guided AR distribution of codebook `stage` at each frame, [B, T, V] fp32."""
        d = self.delays[stage]
        h = self.hidden(codes)[:, d:d + self.frames]  # [2B, T, dim]: position t + delay[s] predicts frame t
        logits = self.lm.head(h, stage)  # [2B, T, V] fp32
        cond, uncond = logits.chunk(2)
        return torch.softmax(guide(cond, uncond, self.cfg_coef), dim=-1)

    @torch.no_grad()
    def __call__(self, codes: torch.Tensor, stage: int) -> torch.Tensor:
        """codes [B, K, T] -> p_ar [B, T] fp32 of each token of codebook `stage`."""
        self.timer.start()
        p = self.probs(codes, stage).gather(-1, codes[:, stage, :, None]).squeeze(-1)
        self.timer.stop()
        return p

    def stats(self) -> dict[str, float]:
        """Per-request cost: calls, total and mean seconds per call (one call per MAGNeT step that reads scores)."""
        sec = self.timer.seconds()
        n = len(sec)
        return {"rescore_calls": float(n), "rescore_s": float(sum(sec)),
                "rescore_s_per_step": float(sum(sec) / n) if n else 0.0}


def build_rescorer(model: ModelConfig, rescorer: ARCompanion, prompts: list[str | None], gen: GenerationConfig
                   ) -> ARRescorer:
    """The hook for one request (T' = MAGNeT's output frames); the request was checked when built (engine.request)."""
    cfg = gen.ar_cfg if gen.ar_cfg is not None else rescorer.defaults.cfg_max
    return ARRescorer(rescorer, prompts, output_frames(model, gen), cfg)
