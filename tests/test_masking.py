"""Span selection and schedule against a literal per-item port of the reference's algorithm."""
from __future__ import annotations

import math

import pytest
import torch
from magnet_engine.engine.masking import DONT_REMASK, chunk_mask, least_probable_spans, stage_schedule


def _reference_lps(scores: torch.Tensor, n_target: int, span: int) -> torch.Tensor:
    """audiocraft `_least_probable_span_masking` for one item, loop for loop. scores [T] -> [T] bool."""
    t = scores.shape[-1]
    span_scores = scores.unfold(0, span, 1).sum(dim=-1)
    order = torch.argsort(span_scores, descending=True)

    def spans(starts: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(t, dtype=torch.bool)
        mask[starts] = True
        shifted = mask.clone()
        for _ in range(span - 1):
            shifted = torch.cat([torch.zeros(1, dtype=torch.bool), shifted[:-1]])
            mask = mask | shifted
        return mask

    m = max(n_target, span)
    lo, hi = m // span, m - span + 1
    mid = round(0.5 * (lo + hi))
    if mid in (lo, hi):
        return spans(order[:mid])
    mask = None
    while lo < mid < hi:
        mask = spans(order[:mid])
        if mask.sum() > m:
            hi = mid
        else:
            lo = mid
        mid = round(0.5 * (lo + hi))
    return mask


@pytest.mark.parametrize("t", [7, 50, 498, 500])
@pytest.mark.parametrize("span", [2, 3, 4])
def test_stride1_matches_reference_search(t, span):
    g = torch.Generator().manual_seed(t * 10 + span)
    for trial in range(12):
        scores = -torch.log(torch.rand(5, t, generator=g))
        fixed = torch.rand(5, t, generator=g) < trial / 12  # some positions already final
        scores = scores.masked_fill(fixed, DONT_REMASK)
        for n in sorted({1, 2, span, t // 7 + 1, t // 3, t // 2, t - 1}):
            if n < 1:
                continue
            got = least_probable_spans(scores, n, span)
            want = torch.stack([_reference_lps(s, n, span) for s in scores])
            assert torch.equal(got, want), (t, span, trial, n)


def test_chunk_mask_expands_spans():
    scores = torch.tensor([[0.1, 0.9, 0.5, DONT_REMASK]])
    chunks, frames = chunk_mask(scores, 2, 3)
    assert chunks.tolist() == [[False, True, True, False]]
    assert frames.tolist() == [[False] * 3 + [True] * 6 + [False] * 3]


def test_schedule_follows_cosine_and_floors():
    plans = stage_schedule(10, 166, 10.0, 1.0, 3.0, True)
    assert plans[0].n_mask == 166 and plans[0].cfg_coef == pytest.approx(10.0)
    assert plans[-1].n_mask == 1, "cos(π/2) rounds to ~-4e-8 in float32: the last step still re-masks one span"
    assert plans[-1].cfg_coef == pytest.approx(1.0, abs=1e-6)
    # the reference divides by S, not S - 1: the first step is already at 9/10 of the temperature
    assert plans[-1].temperature == 0.01 and plans[0].temperature == pytest.approx(2.7)
    assert all(a.n_mask >= b.n_mask for a, b in zip(plans, plans[1:]))
    for i, p in enumerate(plans):
        assert p.mask_p == pytest.approx(math.cos(math.pi / 2 * i / 9), abs=1e-6)
    const = stage_schedule(4, 10, 3.0, 3.0, 1.0, False)
    assert all(p.temperature == 1.0 and p.cfg_coef == pytest.approx(3.0) for p in const)
