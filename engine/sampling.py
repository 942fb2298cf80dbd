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

    top_p: a number or a tensor broadcasting against [.., 1] (one per row). Equal to the reference's
    sort-and-exclusive-cumsum rule except among exactly tied probabilities (all kept here),
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
    logits = guide(cond, uncond, rp.cfg_coef.view(b, 1, 1))  # [B, T, V]
    probs = torch.softmax(logits / rp.temperature.view(b, 1, 1), dim=-1)
    sampled = logits.argmax(dim=-1)  # greedy rows
    if modes != {GREEDY}:
        assert uniform is not None, "sampling needs uniform noise"
        weights, chosen_from = probs, probs  # multinomial rows
        row_mode = rp.mode.view(b, 1, 1)
        if TOP_P in modes:
            nucleus = probs * top_p_keep(probs, rp.top_p.view(b, 1, 1))
            weights = torch.where(row_mode == TOP_P, nucleus, weights)
        if TOP_K in modes:
            # k-th largest per row (the reference's topk(...).values[..., -1]); rows not in top-k mode read k = 1
            k = torch.where(rp.mode == TOP_K, rp.top_k, 1)
            top = torch.topk(probs, rp.k_max, dim=-1).values  # [B, T, k_max], descending
            kth = top.gather(-1, (k - 1).view(b, 1, 1).expand(b, probs.shape[1], 1))
            # the reference renormalises top-k in place, so the *renormalised* probability scores the spans
            kept = probs * (probs >= kth)
            kept = kept / kept.sum(dim=-1, keepdim=True)
            weights = torch.where(row_mode == TOP_K, kept, weights)
            chosen_from = torch.where(row_mode == TOP_K, kept, chosen_from)
        drawn = inverse_cdf(weights, uniform)
        sampled = torch.where(rp.mode.view(b, 1) == GREEDY, sampled, drawn)
        probs = chosen_from
    chosen = probs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
    tokens = torch.where(current == mask_id, sampled, current)
    return tokens, chosen
