"""The nucleus (top-p) keep rule without a sort: `top_p_threshold_radix` (what `top_p_keep` uses on CPU) keeps the
very tokens the rule keeps (a token is kept when the mass strictly more probable than it is <= top_p), checked
against the rule computed in float64 and against the sort-based threshold, on random and adversarial rows."""
from __future__ import annotations

import pytest
import torch
from magnet_engine.engine.sampling import (
    StepSampling,
    sample_ref,
    top_p_keep,
    top_p_threshold_radix,
    top_p_threshold_sorted,
)


def _rule64(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule in float64 -> (kept [R, V] bool, settled [R, V] bool: the token's strictly-more-probable mass is
    farther from top_p than an fp32 sum over V terms can err, so any fp32 implementation must decide it alike)."""
    p = probs.double()
    desc = p.sort(-1, descending=True).values
    greater = p.shape[-1] - torch.searchsorted(desc.flip(-1), p, right=True)  # [R, V]: how many are more probable
    inclusive = torch.cat([torch.zeros_like(p[..., :1]), desc.cumsum(-1)], -1)
    above = inclusive.gather(-1, greater)  # [R, V]: the mass strictly more probable than each token
    err = probs.shape[-1] * 2.0 ** -24 * 2  # n terms, each sum's rounding <= eps/2 of a total <= 1, twice (sorted: -p)
    return above <= top_p, (above - top_p).abs() > err


def _check(probs: torch.Tensor, top_p: float) -> None:
    kept, settled = _rule64(probs, top_p)
    radix = probs >= top_p_threshold_radix(probs, top_p)
    assert torch.equal(radix, top_p_keep(probs, top_p))
    assert torch.equal(radix[settled], kept[settled])
    # a keep set is always every token at or above a threshold, and the most probable tokens are always kept
    assert torch.equal(radix, probs >= torch.where(radix, probs, 2.0).min(-1, keepdim=True).values)
    assert radix.gather(-1, probs.argmax(-1, keepdim=True)).all()
    # where no token sits on the boundary, the radix and the sort-based thresholds keep the same tokens
    clean = settled.all(-1)
    assert torch.equal(radix[clean], (probs >= top_p_threshold_sorted(probs, top_p))[clean])


@pytest.mark.parametrize("top_p", [0.0, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("v", [1, 2, 37, 1024])
def test_radix_keep_matches_rule_random(v: int, top_p: float) -> None:
    g = torch.Generator().manual_seed(v)
    scale = torch.tensor([0.1, 1.0, 3.0, 10.0, 40.0]).repeat_interleave(8).view(-1, 1)  # flat to peaked rows
    probs = torch.softmax(torch.randn(scale.shape[0], v, generator=g) * scale, dim=-1)
    _check(probs, top_p)


@pytest.mark.parametrize("top_p", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_radix_keep_matches_rule_adversarial(top_p: float) -> None:
    v = 64
    g = torch.Generator().manual_seed(0)
    one_hot = torch.zeros(v).index_fill_(0, torch.tensor([17]), 1.0)
    flat = torch.full((v,), 1.0 / v)
    ties = torch.softmax(torch.randint(0, 3, (v,), generator=g).float(), dim=-1)  # three tied levels
    halves = torch.zeros(v).index_fill_(0, torch.tensor([3, 40]), 0.5)  # two tied tokens, mass exactly 0.5 each
    dyadic = torch.zeros(v)  # 1/2, 1/4, ..., 2**-20 twice: every mass above a token exact, some exactly top_p
    dyadic[:21] = 2.0 ** -torch.arange(1, 22).clamp(max=20).float()
    tiny = torch.softmax(torch.linspace(0.0, -120.0, v), dim=-1)  # subnormal and zero probabilities
    rows = torch.stack([one_hot, flat, ties, halves, dyadic, tiny])
    _check(rows, top_p)
    keep = top_p_keep(rows, top_p)
    assert keep[1].all() and keep[3].sum() == (2 if top_p < 1 else v)  # tied tokens go together
    assert keep[0].sum() == (1 if top_p < 1 else v)
    # masses above the dyadic tokens: 0, 1/2, 3/4, 7/8, 15/16, ... (kept when <= top_p, equality included)
    assert keep[4].sum() == {0.0: 1, 0.25: 1, 0.5: 2, 0.9: 4, 1.0: v}[top_p]


def test_radix_keep_per_row_top_p_and_shape() -> None:
    """One top_p per row ([B, 1, 1], as the sampler passes it) over [B, T, V]: each row as if alone."""
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(3, 5, 300, generator=g) * 4, dim=-1)
    top_p = torch.tensor([0.0, 0.5, 0.95]).view(3, 1, 1)
    keep = top_p_keep(probs, top_p)
    assert keep.shape == probs.shape
    for b in range(3):
        assert torch.equal(keep[b], top_p_keep(probs[b], float(top_p[b])))
        assert torch.equal(keep[b:b + 1], top_p_keep(probs[b:b + 1], top_p[b:b + 1]))


@pytest.mark.parametrize("params", [
    StepSampling(3.0, 1.0, 0, 0.9, False), StepSampling(1.0, 0.7, 0, 0.0, False),
    StepSampling(2.0, 1.0, 5, 0.0, False), StepSampling(1.0, 1.0, 0, 0.0, True),
    StepSampling((1.0, 4.0), (1.0, 0.5), (0, 3), (1.0, 0.0), (False, False)),
    StepSampling(1.0, (1.0, 2.0), (0, 0), (0.5, 0.0), (False, True))],
    ids=["top_p", "multinomial", "top_k", "greedy", "per-row-top_p1-top_k", "per-row-greedy"])
def test_sampler_at_some_positions_equals_all_positions(params: StepSampling) -> None:
    """`sample_ref` over a subset of the positions (what a CPU decoding step passes: the re-masked chunks' frames)
    gives, at those positions, the very tokens and probabilities of the call over every position: random rows from
    flat to peaked and adversarial ones (one-hot, flat, tied levels, a huge logit), masked and unmasked."""
    g = torch.Generator().manual_seed(2)
    b, t, v = 2, 40, 300
    scale = torch.tensor([0.1, 1.0, 3.0, 10.0, 40.0]).repeat(t // 5).view(1, t, 1)
    cond = torch.randn(b, t, v, generator=g) * scale
    uncond = torch.randn(b, t, v, generator=g) * scale
    for logits in (cond, uncond):
        logits[:, 0] = 0.0  # flat
        logits[:, 1] = -1e4
        logits[:, 1, 7] = 1e4  # one-hot
        logits[:, 2] = torch.randint(0, 3, (v,), generator=g).float()  # three tied levels
        logits[:, 3, ::2] = 88.0  # huge, tied
    current = torch.where(torch.rand(b, t, generator=g) < 0.7, v, torch.randint(0, v, (b, t), generator=g))
    uniform = torch.rand(b, t, generator=g)
    index = torch.stack([torch.randperm(t, generator=g)[:17].sort().values for _ in range(b)])  # [B, 17]
    for guided in (True, False):
        un = uncond if guided else cond
        tokens, probs = sample_ref(cond, un, current, v, params, uniform)
        pick = index.unsqueeze(-1).expand(-1, -1, v)
        c = cond.gather(1, pick)
        sub_t, sub_p = sample_ref(c, uncond.gather(1, pick) if guided else c, current.gather(1, index), v, params,
                                  uniform.gather(1, index))
        assert torch.equal(sub_t, tokens.gather(1, index)) and torch.equal(sub_p, probs.gather(1, index))
