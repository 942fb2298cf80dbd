"""One decoding step's token choice in plain PyTorch: guidance, temperature, top-k / top-p / multinomial or argmax,
the chosen token's probability, and the write-back into masked positions only.

This is the reference for `kernels.sampling` and the torch/onnx path of the decoding loop. All of it runs in fp32
whatever the model dtype: CFG λ up to 10 and temperature down to 0.01 overflow fp16 (audiocraft#564).

Random choice is by inverse CDF over the vocabulary in index order with one uniform number per position, so any
implementation given the same `uniform` picks the same token; the distribution is the reference's (audiocraft
`sample_top_p` / `sample_top_k` / `multinomial`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepSampling:
    """What one step needs besides logits; built by the decoding loop from `GenerationConfig` and the schedule."""

    cfg_coef: float  # λ in uncond + λ·(cond − uncond)
    temperature: float  # already floored at 0.01 by the schedule
    top_k: int  # 0 = off
    top_p: float  # 0 = off; takes precedence over top_k as in the reference
    greedy: bool  # argmax of the guided logits; probabilities still tempered (they drive span scores)


def guide(cond: torch.Tensor, uncond: torch.Tensor, cfg_coef: float) -> torch.Tensor:
    """[B, T, V] x2 -> fp32 guided logits, in the reference's operation order."""
    cond, uncond = cond.float(), uncond.float()
    return uncond + (cond - uncond) * cfg_coef


def top_p_keep(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus as a threshold: keep tokens whose strictly-more-probable mass is <= top_p. [.., V] -> bool [.., V].

    Equal to the reference's sort-and-exclusive-cumsum rule except among exactly tied probabilities (all kept here),
    and computable without a sort, which is what the Triton kernel does.
    """
    sorted_p, _ = torch.sort(probs, dim=-1, descending=True)
    exclusive = torch.cumsum(sorted_p, dim=-1) - sorted_p
    n_keep = (exclusive <= top_p).sum(dim=-1, keepdim=True).clamp(min=1)
    threshold = sorted_p.gather(-1, n_keep - 1)
    return probs >= threshold


def inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Draw index i with probability weights[i]/sum(weights). weights [.., V] >= 0, uniform [..] in [0, 1)."""
    cdf = torch.cumsum(weights, dim=-1)
    target = (uniform * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_(max=weights.shape[-1] - 1)


def sample_ref(cond: torch.Tensor, uncond: torch.Tensor, current: torch.Tensor, mask_id: int, params: StepSampling,
               uniform: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose tokens for one step.

    cond, uncond [B, T, V] logits; current [B, T] int64 tokens (mask_id where masked); uniform [B, T] fp32 in [0, 1)
    (None when greedy). Returns (tokens [B, T]: sampled where current == mask_id, current elsewhere;
    probs [B, T] fp32: the sampled token's probability, which is what span scoring reads).
    """
    logits = guide(cond, uncond, params.cfg_coef)  # [B, T, V]
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.greedy:
        sampled = logits.argmax(dim=-1)
    else:
        assert uniform is not None, "sampling needs uniform noise"
        if params.top_p > 0.0:
            sampled = inverse_cdf(probs * top_p_keep(probs, params.top_p), uniform)
        elif params.top_k > 0:
            kth = torch.topk(probs, params.top_k, dim=-1).values[..., -1:]
            # the reference renormalises top-k in place, so the *renormalised* probability scores the spans
            probs = probs * (probs >= kth)
            probs = probs / probs.sum(dim=-1, keepdim=True)
            sampled = inverse_cdf(probs, uniform)
        else:
            sampled = inverse_cdf(probs, uniform)
    chosen = probs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
    tokens = torch.where(current == mask_id, sampled, current)
    return tokens, chosen
