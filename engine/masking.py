"""MAGNeT's mask schedule and span selection (audiocraft `MagnetLMModel._generate_stage`), vectorised over the batch.

Spans, nonoverlap (span_len L = 3, T trimmed to a multiple of L):
    frames  |0 1 2|3 4 5|6 7 8| ...      one score per chunk; re-mask the n highest-scored chunks
Spans, stride1: every window of L frames is a candidate; pick the top windows whose union covers ~n frames
    (the reference's binary search over the number of windows, reproduced exactly, without a loop over the batch).
"""
from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=256)  # every request of a shape asks the same: built once (a scheduler's burst)
def stage_schedule(steps: int, n_gen: int, cfg_max: float, cfg_min: float, temperature: float, anneal: bool
                   ) -> tuple[StepPlan, ...]:
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
    return tuple(plans)


def descending_rank(scores: torch.Tensor, stable: bool = True) -> torch.Tensor:
    """scores [B, C] -> rank [B, C] int64: each entry's place in descending order; `stable`: equal scores by lower
    index first, whatever the device (else in the order torch's sort leaves them)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=stable)
    positions = torch.arange(order.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def top_n(scores: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    """scores [B, C] -> bool [B, C]: the n highest of each row (ties: lower index first). n may be a device tensor
    (0-d or [B, 1]), so the shape never depends on the step."""
    return descending_rank(scores) < n


def chunk_mask(scores: torch.Tensor, n_mask: torch.Tensor | int, span_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [B, C] chunk scores -> (chunks [B, C] bool: the n_mask highest, frames [B, C·span_len] bool)."""
    chunks = top_n(scores, n_mask)
    return chunks, chunks.repeat_interleave(span_len, dim=-1)


def chunk_frames(chunks: torch.Tensor, n: int, span_len: int) -> torch.Tensor:
    """chunks [B, C] bool with exactly n true per row -> [B, n·span_len] int64: their frames, in index order."""
    picked = torch.argsort(chunks.to(torch.uint8), dim=-1, descending=True, stable=True)[:, :n]  # [B, n]
    offsets = torch.arange(span_len, device=chunks.device)
    return (picked.unsqueeze(-1) * span_len + offsets).flatten(1)


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


def least_probable_spans(scores: torch.Tensor, n_target: torch.Tensor | int, span_len: int) -> torch.Tensor:
    """stride1 masking: scores [B, T] (−log p, DONT_REMASK for fixed) -> [B, T] bool frames to re-mask.

    Same result as the reference's per-item binary search, including its quirks: the search runs over the number u
    of top windows in [m // L, m − L + 1] from round-half-even midpoints, and returns the
    *last evaluated* union. Items run in lockstep; an item whose search has ended keeps its mask. `n_target` may be
    a device tensor: the search always runs its largest possible number of rounds (the interval is at most T wide),
    finished rounds changing nothing, so neither shapes nor control flow depend on data.
    """
    b, t = scores.shape
    span_scores = scores.unfold(-1, span_len, 1).sum(dim=-1)  # [B, W]
    # the reference's order: torch.argsort, not stable (equal sums, e.g. of windows over fixed frames, come in the
    # order torch's sort leaves them, which is what the reference's tokens were computed with)
    rank = descending_rank(span_scores, stable=False)  # rank[b, start] = place in score order

    n = torch.as_tensor(n_target, device=scores.device)
    m = torch.clamp(n, min=span_len).view(1, 1).expand(b, 1)  # [B, 1]
    lo, hi = m // span_len, m - span_len + 1
    mid = torch.round((lo + hi).float() * 0.5).long()  # exact for ints < 2**24; round half to even as Python
    mask = _cover(rank, mid, t, span_len)
    active = (mid > lo) & (mid < hi)  # [B, 1]: the reference returns at once when mid is an end
    # the interval at least halves every round and the search stops once it is < 2 wide
    for _ in range(t.bit_length() + 1):
        evaluated = _cover(rank, mid, t, span_len)
        mask = torch.where(active, evaluated, mask)
        over = evaluated.sum(dim=-1, keepdim=True) > m
        hi = torch.where(active & over, mid, hi)
        lo = torch.where(active & ~over, mid, lo)
        mid = torch.where(active, torch.round((lo + hi).float() * 0.5).long(), mid)
        active = active & (mid > lo) & (mid < hi)
    return mask
