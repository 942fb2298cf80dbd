"""MAGNeT's mask schedule and span selection (audiocraft `MagnetLMModel._generate_stage`), vectorised over the batch.

Spans, nonoverlap (span_len L = 3, T trimmed to a multiple of L):
    frames  |0 1 2|3 4 5|6 7 8| ...      one score per chunk; re-mask the n highest-scored chunks
Spans, stride1: every window of L frames is a candidate; pick the top windows whose union covers ~n frames
    (the reference's binary search over the number of windows, reproduced exactly, without a loop over the batch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DONT_REMASK = -1e4  # score of fixed positions (prompt, or already final): never among the top-n


@dataclass(frozen=True)
class StepPlan:
    """Host-side numbers of one decoding step, all known before the loop starts (no device sync inside it)."""

    n_mask: int  # how many spans (nonoverlap) or frames (stride1) to re-mask
    mask_p: float  # mask rate cos(π/2·τ)
    cfg_coef: float  # λ = p·max + (1−p)·min
    temperature: float  # floored at 0.01


def stage_schedule(steps: int, n_gen: int, cfg_max: float, cfg_min: float, temperature: float, anneal: bool
                   ) -> list[StepPlan]:
    """The reference's per-step numbers, computed in float32 exactly as it does (τ = linspace(0, 1, S))."""
    taus = torch.linspace(0, 1, steps, dtype=torch.float32)
    mask_p = torch.cos(taus * math.pi * 0.5)  # float32, as the reference: cos(π/2) ≈ -4e-8, so n_mask floors at 1
    n_mask = (mask_p * n_gen).tolist()
    plans = []
    for i, (p, n) in enumerate(zip(mask_p.tolist(), n_mask)):
        steps_left = steps - 1 - i
        t = temperature * (steps_left / steps) if anneal else temperature
        plans.append(StepPlan(n_mask=max(int(n), 1), mask_p=p, cfg_coef=p * cfg_max + (1 - p) * cfg_min,
                              temperature=max(t, 1e-2)))
    return plans


def chunk_mask(scores: torch.Tensor, n_mask: int, span_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [B, C] chunk scores -> (chunks [B, C] bool: the n_mask highest, frames [B, C·span_len] bool)."""
    top = scores.topk(n_mask, dim=-1).indices
    chunks = torch.zeros_like(scores, dtype=torch.bool).scatter(1, top, True)
    return chunks, chunks.repeat_interleave(span_len, dim=-1)


def chunk_scores(probs: torch.Tensor, span_len: int, scoring: str) -> torch.Tensor:
    """probs [B, T] of the sampled tokens -> [B, T/span_len] re-mask priority (high = least confident)."""
    b = probs.shape[0]
    if scoring == "max":
        return 1 - probs.reshape(b, -1, span_len).max(dim=-1).values
    return (-torch.log(probs)).reshape(b, -1, span_len).sum(dim=-1)


def _cover(rank: torch.Tensor, u: torch.Tensor | int, t: int, span_len: int) -> torch.Tensor:
    """Frames covered by the union of the first u windows in score order. rank [B, W] -> [B, T] bool."""
    starts = rank < u  # [B, W], W = T - span_len + 1
    w = starts.shape[-1]
    mask = torch.zeros(starts.shape[0], t, dtype=torch.bool, device=rank.device)
    for shift in range(span_len):
        mask[:, shift:shift + w] |= starts
    return mask


def least_probable_spans(scores: torch.Tensor, n_target: int, span_len: int) -> torch.Tensor:
    """stride1 masking: scores [B, T] (−log p, DONT_REMASK for fixed) -> [B, T] bool frames to re-mask.

    Same result as the reference's per-item binary search, including its quirks: the search runs over the number u
    of top windows in [m // L, m − L + 1] from round-half-even midpoints, and returns the *last evaluated* union.
    Items run in lockstep; an item whose search has ended keeps its mask.
    """
    b, t = scores.shape
    span_scores = scores.unfold(-1, span_len, 1).sum(dim=-1)  # [B, W]
    order = torch.argsort(span_scores, dim=-1, descending=True)
    positions = torch.arange(order.shape[-1], device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)  # rank[b, start] = place in score order

    m = max(n_target, span_len)
    lo, hi = m // span_len, m - span_len + 1
    mid = round(0.5 * (lo + hi))
    if mid in (lo, hi):
        return _cover(rank, mid, t, span_len)

    def as_col(v: int) -> torch.Tensor:
        return torch.full((b, 1), v, dtype=torch.long, device=scores.device)

    lo_t, hi_t, mid_t = as_col(lo), as_col(hi), as_col(mid)
    active = torch.ones(b, 1, dtype=torch.bool, device=scores.device)
    mask = torch.zeros(b, t, dtype=torch.bool, device=scores.device)
    # the interval at least halves every round and the search stops once it is < 2 wide
    for _ in range((hi - lo).bit_length() + 1):
        evaluated = _cover(rank, mid_t, t, span_len)
        mask = torch.where(active, evaluated, mask)
        over = evaluated.sum(dim=-1, keepdim=True) > m
        hi_t = torch.where(active & over, mid_t, hi_t)
        lo_t = torch.where(active & ~over, mid_t, lo_t)
        mid_t = torch.where(active, torch.round((lo_t + hi_t).float() * 0.5).long(), mid_t)
        active = active & (mid_t > lo_t) & (mid_t < hi_t)
    return mask
