"""One decoding step's token choice as a single Triton kernel, a drop-in for `engine.sampling.sample_ref`.

Each program takes ROWS positions and holds their whole vocabulary row ([ROWS, BLOCK_V], BLOCK_V = next power of
two >= V, tail masked) in registers, so the cond/uncond logits are read from memory exactly once:

    guidance (fp32, reference order) -> /temperature -> softmax (max, exp, sum) -> greedy argmax
    | top-k threshold | top-p threshold -> inverse-CDF choice (tl.cumsum) -> chosen prob -> write-back if masked

Thresholds without a sort: probabilities are >= 0, so their fp32 bit patterns, read as int32, order like the
values. A bisection over the 2**31 bit patterns (31 halvings, each one masked reduction over the row) therefore
lands *exactly* on the k-th largest probability (top-k, ties kept like `probs >= kth`) or on the smallest
probability whose strictly-more-probable mass is <= top_p (the `top_p_keep` rule).

Parameters are per row b (the scheduler batches requests at different steps with their own settings): each position
reads its row's guidance, temperature, mode, k and p; the constexpr flags only drop the code no row needs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from magnet_engine.engine.sampling import GREEDY, TOP_K, TOP_P, RowParams, StepSampling, row_tensors, sample_ref
from triton.runtime.jit import JITFunction

__all__ = ["INTERPRETED", "MAX_VOCAB", "sample", "sample_ref"]

MAX_VOCAB = 16384  # a row lives in registers; past this use sample_ref
_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BISECT_STEPS = tl.constexpr(31)  # an interval of < 2**31 bit patterns halves to width 1 in 31 steps
_F32_INF_BITS = tl.constexpr(0x7F800000)


@triton.jit
def _sample_step(
    COND, UNCOND,  # [B, T, V] logits, any float dtype and strides
    CURRENT,  # [B, T] int64
    UNIFORM,  # [B, T] fp32 in [0, 1); not read when every row is greedy
    TOKENS,  # [B, T] int64 out, contiguous
    PROBS,  # [B, T] fp32 out, contiguous
    CFG, TEMP, TOP_P,  # [B] fp32 per-row guidance, temperature, nucleus mass
    TOP_K, ROW_MODE,  # [B] int64 per-row k and mode (0 greedy, 1 multinomial, 2 top-k, 3 top-p)
    scb, sct, scv,  # cond strides
    sub, sut, suv,  # uncond strides
    smb, smt,  # current strides
    srb, srt,  # uniform strides
    R, T, V,  # R = B * T positions
    mask_id,
    SAMPLED: tl.constexpr,  # some row draws (mode >= 1)
    HAS_TOP_K: tl.constexpr,  # some row is top-k: run its bisection
    HAS_TOP_P: tl.constexpr,  # some row is top-p: run its bisection
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS] flat position b * T + t
    row_ok = rows < R
    b = (rows // T).to(tl.int64)
    t = (rows % T).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)  # [BLOCK_V] vocabulary index
    col_ok = cols < V
    ok = row_ok[:, None] & col_ok[None, :]  # [ROWS, BLOCK_V]
    cfg_coef = tl.load(CFG + b, mask=row_ok, other=1.0)  # [ROWS] each position's row parameters
    temperature = tl.load(TEMP + b, mask=row_ok, other=1.0)
    mode = tl.load(ROW_MODE + b, mask=row_ok, other=0)

    c = tl.load(COND + b[:, None] * scb + t[:, None] * sct + cols[None, :] * scv, mask=ok, other=0.0)
    u = tl.load(UNCOND + b[:, None] * sub + t[:, None] * sut + cols[None, :] * suv, mask=ok, other=0.0)
    c = c.to(tl.float32)
    u = u.to(tl.float32)
    logits = u + (c - u) * cfg_coef[:, None]  # [ROWS, BLOCK_V] fp32, same operation order as engine.sampling.guide
    logits = tl.where(col_ok[None, :], logits, float("-inf"))

    # tempered softmax; division (not a reciprocal multiply) as in the reference; the tail gets exp(-inf) = 0
    x = logits / temperature[:, None]
    x_max = tl.max(x, axis=1)  # [ROWS]
    e = tl.exp(x - x_max[:, None])
    probs = e / tl.sum(e, axis=1)[:, None]  # [ROWS, BLOCK_V]

    sampled = tl.argmax(logits, axis=1)  # greedy rows: first maximum, like torch.argmax
    chosen_from = probs
    if SAMPLED:
        weights = probs  # multinomial rows
        # >= 0 floats order like their int32 bit patterns; the masked tail gets -1, below every real probability
        bits = tl.where(col_ok[None, :], probs.to(tl.int32, bitcast=True), -1)  # [ROWS, BLOCK_V]
        if HAS_TOP_K:
            # largest bit pattern `lo` with count(p >= lo) >= k: exactly the k-th largest probability
            top_k = tl.load(TOP_K + b, mask=row_ok, other=1)
            lo = tl.zeros([ROWS], dtype=tl.int32)
            hi = tl.full([ROWS], _F32_INF_BITS + 1, dtype=tl.int32)
            for _ in range(_BISECT_STEPS):
                mid = lo + (hi - lo) // 2
                count = tl.sum((bits >= mid[:, None]).to(tl.int32), axis=1)
                enough = count >= top_k
                lo = tl.where(enough, mid, lo)
                hi = tl.where(enough, hi, mid)
            kept = tl.where(bits >= lo[:, None], probs, 0.0)
            # the reference renormalises in place: the renormalised probability is drawn from and returned
            # (a row in another mode may keep nothing, k = 0: divide it by 1, its result is not used)
            is_k = (mode == 2)[:, None]
            kept = kept / tl.where(is_k, tl.sum(kept, axis=1)[:, None], 1.0)
            weights = tl.where(is_k, kept, weights)
            chosen_from = tl.where(is_k, kept, chosen_from)
        if HAS_TOP_P:
            # smallest bit pattern `hi` whose strictly-greater mass is <= top_p; keep p >= hi (top_p_keep's rule)
            top_p = tl.load(TOP_P + b, mask=row_ok, other=0.0)
            lo = tl.full([ROWS], -1, dtype=tl.int32)
            hi = tl.full([ROWS], _F32_INF_BITS, dtype=tl.int32)
            for _ in range(_BISECT_STEPS):
                mid = lo + (hi - lo) // 2
                mass = tl.sum(tl.where(bits > mid[:, None], probs, 0.0), axis=1)
                small = mass <= top_p
                hi = tl.where(small, mid, hi)
                lo = tl.where(small, lo, mid)
            nucleus = tl.where(bits >= hi[:, None], probs, 0.0)  # not renormalised, like the reference
            weights = tl.where((mode == 3)[:, None], nucleus, weights)
        # inverse CDF in index order: the first index whose cdf exceeds uniform * total (searchsorted right=True)
        uni = tl.load(UNIFORM + b * srb + t * srt, mask=row_ok, other=0.0)  # [ROWS]
        cdf = tl.cumsum(weights, axis=1)  # [ROWS, BLOCK_V]
        total = tl.max(cdf, axis=1)  # = cdf[V - 1]: weights are >= 0 and the tail adds 0
        target = uni * total
        below = (cdf <= target[:, None]) & col_ok[None, :]
        drawn = tl.minimum(tl.sum(below.to(tl.int32), axis=1), V - 1)
        sampled = tl.where(mode == 0, sampled, drawn)

    chosen = tl.sum(tl.where(cols[None, :] == sampled[:, None], chosen_from, 0.0), axis=1)  # [ROWS]
    current = tl.load(CURRENT + b * smb + t * smt, mask=row_ok, other=0)
    tokens = tl.where(current == mask_id, sampled.to(tl.int64), current)
    tl.store(TOKENS + rows, tokens, mask=row_ok)
    tl.store(PROBS + rows, chosen, mask=row_ok)


# decided by triton when this module was imported (TRITON_INTERPRET=1: numpy interpreter, any device)
INTERPRETED = not isinstance(_sample_step, JITFunction)


def _check(cond: torch.Tensor, uncond: torch.Tensor, current: torch.Tensor, mask_id: int, params: StepSampling,
           uniform: torch.Tensor | None) -> None:
    """Raise TypeError/ValueError saying what to change; the kernel itself trusts its inputs."""
    for name, x in (("cond", cond), ("uncond", uncond), ("current", current)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"sample: {name} must be a torch.Tensor, got {type(x).__name__}")
    if cond.dim() != 3:
        raise ValueError(f"sample: cond must be [B, T, V] logits, got shape {tuple(cond.shape)}")
    if uncond.shape != cond.shape:
        raise ValueError(f"sample: uncond {tuple(uncond.shape)} must have cond's shape {tuple(cond.shape)}")
    for name, x in (("cond", cond), ("uncond", uncond)):
        if x.dtype not in _LOGIT_DTYPES:
            raise TypeError(f"sample: {name} has dtype {x.dtype}; cast logits to float32, float16 or bfloat16")
    B, T, V = cond.shape
    if current.shape != (B, T):
        raise ValueError(f"sample: current must be [B, T] = {(B, T)}, got {tuple(current.shape)}")
    if current.dtype != torch.int64:
        raise TypeError(f"sample: current must be int64 tokens, got {current.dtype}; call .long()")
    if isinstance(mask_id, bool) or not isinstance(mask_id, int):
        raise TypeError(f"sample: mask_id must be an int, got {type(mask_id).__name__}")
    if V < 1 or V > MAX_VOCAB:
        raise ValueError(f"sample: vocabulary V = {V} must be in 1..{MAX_VOCAB} (a row is held on chip); "
                         "use engine.sampling.sample_ref for larger V")
    if isinstance(params, RowParams):  # the decoding program's tensors: their values were checked with the request
        _check_rows(params, B, cond.device)
        sampled, k_max = params.modes != {GREEDY}, params.k_max
    elif isinstance(params, StepSampling):
        rows = params.per_row(B)  # ValueError when a per-row tuple does not have B values
        if not all(temp > 0.0 for _, temp, _, _, _ in rows):
            raise ValueError(f"sample: temperature must be > 0, got {params.temperature}")
        sampled = params.any_sampled
        k_max = max((k for (_, _, k, _, _), m in zip(rows, params.modes(B)) if m == TOP_K), default=0)
    else:
        raise TypeError(f"sample: params must be an engine.sampling.StepSampling or RowParams, got "
                        f"{type(params).__name__}")
    devices = {cond.device, uncond.device, current.device}
    if sampled:
        if uniform is None:
            raise ValueError("sample: uniform noise [B, T] is required unless every row is greedy")
        if not isinstance(uniform, torch.Tensor):
            raise TypeError(f"sample: uniform must be a torch.Tensor, got {type(uniform).__name__}")
        if uniform.shape != (B, T):
            raise ValueError(f"sample: uniform must be [B, T] = {(B, T)}, got {tuple(uniform.shape)}")
        if uniform.dtype != torch.float32:
            raise TypeError(f"sample: uniform must be float32, got {uniform.dtype}; call .float()")
        devices.add(uniform.device)
        if k_max > V:
            raise ValueError(f"sample: top_k = {k_max} exceeds the vocabulary V = {V}")
    if len(devices) > 1:
        raise ValueError(f"sample: inputs are on different devices {sorted(map(str, devices))}; move them to one")
    if cond.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"sample: Triton kernels need CUDA tensors, got {cond.device}; use "
                         "engine.sampling.sample_ref on CPU or set TRITON_INTERPRET=1 before importing triton")


def _check_rows(params: RowParams, b: int, device: torch.device) -> None:
    """RowParams: shapes, dtypes and device only (reading their values would synchronise with the device)."""
    for name, dtype in (("cfg_coef", torch.float32), ("temperature", torch.float32), ("top_k", torch.int64),
                        ("top_p", torch.float32), ("mode", torch.int64)):
        x = getattr(params, name)
        if x.shape != (b,) or x.dtype != dtype or x.device != device or (b > 1 and x.stride(0) != 1):
            raise ValueError(f"sample: params.{name} must be a contiguous [B] = [{b}] {dtype} tensor on {device}, "
                             f"got {tuple(x.shape)} {x.dtype} (stride {x.stride()}) on {x.device}")


def sample(cond: torch.Tensor, uncond: torch.Tensor, current: torch.Tensor, mask_id: int,
           params: StepSampling | RowParams, uniform: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose tokens for one step; same contract as `engine.sampling.sample_ref` (= `sample_ref`).

    cond, uncond [B, T, V] logits (fp32/fp16/bf16, any strides); current [B, T] int64 (mask_id where masked);
    uniform [B, T] fp32 in [0, 1) (None when greedy). Returns (tokens [B, T] int64: sampled where
    current == mask_id, current elsewhere; probs [B, T] fp32: the sampled token's (tempered, for top-k
    renormalised) probability).
    """
    _check(cond, uncond, current, mask_id, params, uniform)
    B, T, V = cond.shape
    tokens = torch.empty((B, T), dtype=torch.int64, device=cond.device)
    probs = torch.empty((B, T), dtype=torch.float32, device=cond.device)
    R = B * T
    if R == 0:
        return tokens, probs
    rp = params if isinstance(params, RowParams) else row_tensors(params, B, cond.device)
    modes = rp.modes
    block_v = triton.next_power_of_2(V)
    # Registers bound a GPU program to ~4k row elements; the interpreter pays per program, so it takes more rows.
    budget = 65536 if INTERPRETED else 4096
    rows = max(1, min(triton.next_power_of_2(R), budget // block_v))
    noise = uniform if uniform is not None else probs  # a placeholder pointer: greedy rows never read it
    _sample_step[(triton.cdiv(R, rows),)](
        cond, uncond, current, noise, tokens, probs,
        rp.cfg_coef, rp.temperature, rp.top_p, rp.top_k, rp.mode,
        cond.stride(0), cond.stride(1), cond.stride(2),
        uncond.stride(0), uncond.stride(1), uncond.stride(2),
        current.stride(0), current.stride(1),
        noise.stride(0), noise.stride(1),
        R, T, V, mask_id,
        SAMPLED=modes != {GREEDY}, HAS_TOP_K=TOP_K in modes, HAS_TOP_P=TOP_P in modes, ROWS=rows, BLOCK_V=block_v,
        num_warps=4 if rows * block_v <= 2048 else 8,
        # no FMA contraction: u + (c - u) * cfg must round like the reference's separate multiply and add, or a
        # near-tie could resolve differently from sample_ref given the same noise
        enable_fp_fusion=False,
    )
    return tokens, probs
