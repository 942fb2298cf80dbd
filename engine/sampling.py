"""One decoding step's token choice in plain PyTorch: guidance, temperature, top-k / top-p / multinomial or argmax,
the chosen token's probability, and the write-back into masked positions only.

This is the reference for `kernels.sampling` and the torch/onnx path of the decoding loop. All of it runs in fp32
whatever the model dtype: CFG λ up to 10 and temperature down to 0.01 overflow fp16 (audiocraft#564).

Random choice is by inverse CDF over the vocabulary in index order with one uniform number per position, so any
implementation given the same `uniform` picks the same token; the distribution is the reference's (audiocraft
`sample_top_p` / `sample_top_k` / `multinomial`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Per-row sampling mode, from (greedy, top_p, top_k) in the reference's precedence.
GREEDY, MULTINOMIAL, TOP_K, TOP_P = 0, 1, 2, 3

@dataclass(frozen=True)
class StepSampling:
    """What one step needs besides logits; built by the decoding loop from `GenerationConfig` and the schedule.

    Each field is one value for every row, or a tuple with one value per row (the scheduler batches requests with
    their own settings and schedules into one call). Host-side numbers: reading them never syncs with the device.
    """

    cfg_coef: float | tuple[float, ...]  # λ in uncond + λ·(cond − uncond)
    temperature: float | tuple[float, ...]  # already floored at 0.01 by the schedule
    top_k: int | tuple[int, ...]  # 0 = off
    top_p: float | tuple[float, ...]  # 0 = off; takes precedence over top_k as in the reference
    greedy: bool | tuple[bool, ...]  # argmax of the guided logits; probs still tempered (they drive span scores)

    def per_row(self, b: int) -> list[tuple[float, float, int, float, bool]]:
        """-> b tuples (cfg_coef, temperature, top_k, top_p, greedy); a tuple field must hold exactly b values."""
        cols = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                if len(v) != b:
                    raise ValueError(f"sampling parameter {f.name} has {len(v)} per-row values for {b} rows")
                cols.append(v)
            else:
                cols.append((v,) * b)
        return list(zip(*cols))

    def modes(self, b: int) -> list[int]:
        """Each row's mode: GREEDY, TOP_P (top_p > 0), TOP_K (top_k > 0) or MULTINOMIAL, the reference's order."""
        return [GREEDY if g else TOP_P if p > 0.0 else TOP_K if k > 0 else MULTINOMIAL
                for _, _, k, p, g in self.per_row(b)]

    @property
    def any_sampled(self) -> bool:
        """Whether some row draws (and so needs uniform noise)."""
        g = self.greedy
        return not all(g) if isinstance(g, tuple) else not g

    @staticmethod
    def concat(parts: Sequence[tuple[StepSampling, int]]) -> StepSampling:
        """(params, rows) of several requests -> one StepSampling with a value per row, in order."""
        rows = [r for params, b in parts for r in params.per_row(b)]
        return StepSampling(*(tuple(col) for col in zip(*rows)))


@dataclass(frozen=True)
class RowParams:
    """A step's sampling parameters as device tensors, one value per row: what the sampler reads. The static decoding
    program (engine.magnet) builds them once per request, so a step's sampler call does no host work and no copy.
    `modes` and `k_max` are host-side facts of the request, not data: they pick the code a call runs."""

    cfg_coef: torch.Tensor  # [B] fp32
    temperature: torch.Tensor  # [B] fp32
    top_k: torch.Tensor  # [B] int64
    top_p: torch.Tensor  # [B] fp32
    mode: torch.Tensor  # [B] int64: GREEDY, MULTINOMIAL, TOP_K or TOP_P
    modes: frozenset[int]  # the modes some row takes
    k_max: int  # the largest k of a TOP_K row (0: none)

    @staticmethod
    def concat(parts: Sequence[RowParams]) -> RowParams:
        """Several requests' rows, in order, as one (the scheduler's sampler call over requests of equal length)."""
        if len(parts) == 1:
            return parts[0]
        names = ("cfg_coef", "temperature", "top_k", "top_p", "mode")
        cols = [torch.cat([getattr(p, name) for p in parts]) for name in names]
        return RowParams(*cols, modes=frozenset().union(*(p.modes for p in parts)),
                         k_max=max(p.k_max for p in parts))


def row_tensors(params: StepSampling, b: int, device: torch.device) -> RowParams:
    """-> the parameters of `b` rows on `device` (RowParams).

    The decoding loop and the scheduler both go through these tensors, so one request's arithmetic is the same
    whether its parameters came alone or beside other rows' (a Python scalar operand can round differently:
    CUDA divides by a host scalar as a multiply by its reciprocal). Without a device sync: a value shared by every
    row is a fill; per-row values go through pinned memory with a non-blocking copy.
    """
    def column(values: tuple | float | int | bool, dtype: torch.dtype) -> torch.Tensor:
        if not isinstance(values, tuple):
            return torch.full((b,), values, dtype=dtype, device=device)
        host = torch.tensor(values, dtype=dtype)
        if device.type == "cuda":
            host = host.pin_memory()
        return host.to(device, non_blocking=True)

    modes = params.modes(b)
    mode = modes[0] if len(set(modes)) == 1 else tuple(modes)
    k_max = max((row[2] for row, m in zip(params.per_row(b), modes) if m == TOP_K), default=0)
    return RowParams(column(params.cfg_coef, torch.float32), column(params.temperature, torch.float32),
                     column(params.top_k, torch.long), column(params.top_p, torch.float32), column(mode, torch.long),
                     modes=frozenset(modes), k_max=k_max)


def guide(cond: torch.Tensor, uncond: torch.Tensor, cfg_coef: float | torch.Tensor) -> torch.Tensor:
    """[B, T, V] x2 -> fp32 guided logits, in the reference's operation order. cfg_coef: a number or [B, 1, 1]."""
    cond, uncond = cond.float(), uncond.float()
    return uncond + (cond - uncond) * cfg_coef


def top_p_keep(probs: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Nucleus as a threshold: keep tokens whose strictly-more-probable mass is <= top_p. [.., V] -> bool [.., V].

    probs: probabilities in [0, 1]; top_p: a number or a tensor broadcasting against [.., 1] (one per row). Equal to
    the reference's sort-and-exclusive-cumsum rule except among exactly tied probabilities (all kept here) and
    where a mass lands on top_p within float rounding. On CPU the threshold comes from a radix selection
    (`top_p_threshold_radix`: no sort of [.., V], fixed shapes, no host sync); elsewhere from a sort
    (`top_p_threshold_sorted`: a GPU sorts fast, and its scatter-add's atomics would sum the mass in a varying order).
    """
    if probs.device.type == "cpu":
        return probs >= top_p_threshold_radix(probs, top_p)
    return probs >= top_p_threshold_sorted(probs, top_p)


def top_p_threshold_sorted(probs: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """[.., V] -> [.., 1]: the smallest probability whose strictly-more-probable mass is <= top_p, by a full sort
    and an exclusive cumulative sum (the reference's `sample_top_p`). Kept: probs >= threshold."""
    sorted_p, _ = torch.sort(probs, dim=-1, descending=True)
    exclusive = torch.cumsum(sorted_p, dim=-1) - sorted_p
    n_keep = (exclusive <= top_p).sum(dim=-1, keepdim=True).clamp(min=1)
    return sorted_p.gather(-1, n_keep - 1)


RADIX_BITS = 10  # bucket bits per pass: 1024 buckets
RADIX_PASSES = 3  # 3 x 10 bits cover a probability's bit pattern (p <= 1.0 = 0x3F800000 < 2**30)
# Buckets for the tokens below the candidates, spread by token index: their sums are never read, and most tokens
# fall there after the first pass, so in one bucket their adds would form one dependent chain (~25% of the radix
# selection's time on the default model's distributions)
BELOW_LANES = 8


def top_p_threshold_radix(probs: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """[.., V] -> [.., 1]: the smallest probability whose strictly-more-probable mass is <= top_p, without a sort.

    Probabilities are >= 0, so their fp32 bit patterns, read as int32, order like the values (as in the Triton
    kernel's bisection). A most-significant-digit radix selection over those bits: each of 3 passes histograms the
    mass of the candidates (the tokens whose higher bits equal the threshold's bits found so far) over 1024 buckets
    of their next 10 bits, with everything more probable than the candidates in bucket 0; a cumulative sum then
    gives each bucket's strictly-more-probable mass, and the threshold is in the least probable bucket where that
    mass is <= top_p. After 30 bits the bucket is one bit pattern: exactly the rule's threshold (an empty bucket is
    never the least probable such one unless the rest of the candidates are all kept, and then its bits are below
    them: the same keep set). 3 x (a few elementwise ops, one scatter-add of [.., V], one cumsum of [.., 1033])
    cost less than a sort on CPU; every sum runs within one row in index order, so a row's threshold does not
    depend on the other rows.
    """
    shape = probs.shape
    v = shape[-1]
    p = probs.reshape(-1, v)  # [R, V]
    r = p.shape[0]
    limit = torch.as_tensor(top_p, dtype=torch.float32, device=p.device).expand(*shape[:-1], 1).reshape(r, 1)
    limit = limit.contiguous()  # [R, 1]
    bits = p.view(torch.int32).long()  # [R, V], ordered like p; widened once, not in each pass's shift
    nb = 1 << RADIX_BITS
    index = torch.empty(r, v, dtype=torch.long, device=p.device)  # [R, V] bucket of each token, reused per pass
    # [R, nb + 1 + lanes]: 0 above, 1..nb candidates, the rest below (never read: the cumsum is monotone and the
    # chosen digit is clamped to the candidates')
    hist = torch.empty(r, nb + 1 + BELOW_LANES, device=p.device)
    below = nb + 1 + torch.arange(v, device=p.device) % BELOW_LANES  # [V] each token's bucket when below
    prefix = torch.zeros(r, 1, dtype=torch.long, device=p.device)  # [R, 1] the threshold's bits found so far
    for level in range(RADIX_PASSES):
        shift = RADIX_BITS * (RADIX_PASSES - 1 - level)
        torch.bitwise_right_shift(bits, shift, out=index)
        # this pass's digit relative to the prefix, reversed: nb - (digit - prefix·nb), clamped below at 0, so
        # bucket 0 holds the tokens above the candidates, 1 + j the candidates with digit nb - 1 - j, and those below
        # (> nb) go to their lane's bucket
        if level == 0:
            index.neg_().add_(nb)  # the first digit is <= 0x3F8 (p <= 1.0): in [0, nb) already, no clamp
        else:
            torch.sub((prefix << RADIX_BITS) + nb, index, out=index).clamp_min_(0)
            torch.minimum(index, below, out=index)
        hist.zero_().scatter_add_(1, index, p)
        above = hist.cumsum(1)  # [R, nb + 1 + lanes]: above[:, j < nb] = mass more probable than digit nb - 1 - j
        # the least probable digit whose strictly-more-probable mass is <= top_p (above[:, 0] is, or an earlier
        # pass would not have chosen this prefix; the first pass's is 0)
        j = torch.searchsorted(above, limit, right=True).sub_(1).clamp_(0, nb - 1)  # [R, 1]
        prefix = (prefix << RADIX_BITS) | (nb - 1 - j)
    return prefix.to(torch.int32).view(torch.float32).view(*shape[:-1], 1)


def inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Draw index i with probability weights[i]/sum(weights). weights [.., V] >= 0, uniform [..] in [0, 1)."""
    cdf = torch.cumsum(weights, dim=-1)
    target = (uniform * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_(max=weights.shape[-1] - 1)


def sample_ref(cond: torch.Tensor, uncond: torch.Tensor, current: torch.Tensor, mask_id: int,
               params: StepSampling | RowParams, uniform: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose tokens for one step.

    cond, uncond [B, T, V] logits; current [B, T] int64 tokens (mask_id where masked); uniform [B, T] fp32 in [0, 1)
    (None when every row is greedy; a greedy row's noise is not read). `params`: the rows' device tensors
    (RowParams, what the decoding program passes), or host values (StepSampling: one value or one per row, B).
    Returns (tokens [B, T]: sampled where current == mask_id, current elsewhere; probs [B, T] fp32: the sampled
    token's probability, which is what span scoring reads).

    Every operation is elementwise or reduces over V within a position, so a row's result does not depend on the
    other rows (the scheduler's batch invariance; the modes are selected per row with `where`, never mixed).
    """
    b = cond.shape[0]
    rp = params if isinstance(params, RowParams) else row_tensors(params, b, cond.device)
    modes = rp.modes
    mixed = len(modes) > 1  # else every row takes the one mode: no per-row selection (same numbers, less work)
    # unguided (cond is uncond): uncond + (cond - uncond)·λ is cond itself
    logits = cond.float() if cond is uncond else guide(cond, uncond, rp.cfg_coef.view(b, 1, 1))  # [B, T, V]
    probs = torch.softmax(logits / rp.temperature.view(b, 1, 1), dim=-1)
    sampled = logits.argmax(dim=-1) if GREEDY in modes else None  # greedy rows
    if modes != {GREEDY}:
        assert uniform is not None, "sampling needs uniform noise"
        weights, chosen_from = probs, probs  # multinomial rows
        row_mode = rp.mode.view(b, 1, 1)
        if TOP_P in modes:
            nucleus = probs * top_p_keep(probs, rp.top_p.view(b, 1, 1))
            weights = torch.where(row_mode == TOP_P, nucleus, weights) if mixed else nucleus
        if TOP_K in modes:
            # k-th largest per row (the reference's topk(...).values[..., -1]); rows not in top-k mode read k = 1
            k = torch.where(rp.mode == TOP_K, rp.top_k, 1)
            top = torch.topk(probs, rp.k_max, dim=-1).values  # [B, T, k_max], descending
            kth = top.gather(-1, (k - 1).view(b, 1, 1).expand(b, probs.shape[1], 1))
            # the reference renormalises top-k in place, so the *renormalised* probability scores the spans
            kept = probs * (probs >= kth)
            kept = kept / kept.sum(dim=-1, keepdim=True)
            weights = torch.where(row_mode == TOP_K, kept, weights) if mixed else kept
            chosen_from = torch.where(row_mode == TOP_K, kept, chosen_from) if mixed else kept
        drawn = inverse_cdf(weights, uniform)
        sampled = torch.where(rp.mode.view(b, 1) == GREEDY, sampled, drawn) if sampled is not None else drawn
        probs = chosen_from
    chosen = probs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
    tokens = torch.where(current == mask_id, sampled, current)
    return tokens, chosen
