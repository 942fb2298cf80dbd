"""Flash-attention style forward kernel in Triton, a drop-in for `engine.ops.attention`.

Three uses in MAGNeT, one kernel:
  * full bidirectional self-attention (codebook stage 0): `window=None`, Tq == Tk;
  * banded self-attention |q - k| <= window (stages >= 1): key blocks outside the band are never visited, the
    loop bounds start at the block's first query - window and stop after its last query + window;
  * cross-attention over a short, unpadded text: `window=None`, Tk = L (1..40) != Tq.

Each program owns BLOCK_M queries of one (row, head) and streams key/value blocks of BLOCK_N with an online softmax
(running max m, running sum l, fp32 accumulator), so nothing of size [Tq, Tk] is ever materialised.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from magnet_engine.engine.ops import attention as attention_ref
from triton.runtime.jit import JITFunction

__all__ = ["INTERPRETED", "SUPPORTED_HEAD_DIMS", "attention", "attention_ref"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


@triton.jit
def _rtne_bf16(x):
    """fp32 -> bf16 with round-to-nearest-even; the interpreter's own cast truncates (triton 3.9), the GPU's does
    not. Adding 0x7FFF + lsb then truncating is RTNE (finite x); the final cast is then exact."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _attn_fwd(
    Q, K, V, Out,  # [N, H, Tq, D], [N, H, Tk, D] x2, [N, H, Tq, D]; last dim contiguous
    sqn, sqh, sqt,  # strides of q (elements) for N, H, T
    skn, skh, skt,
    svn, svh, svt,
    son, soh, sot,
    H, TQ, TK, WINDOW,  # WINDOW only read when BAND
    qk_scale,  # 1/sqrt(D) * log2(e): the softmax runs in base 2
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BAND: tl.constexpr,
    UPCAST: tl.constexpr,  # do the dots in fp32 (fp32 inputs, or bf16 under the interpreter)
    IEEE: tl.constexpr,  # fp32 inputs: no TF32 on the GPU, so fp32 matches the fp32 reference
    RTNE_BF16: tl.constexpr,  # bf16 under the interpreter: round like the GPU does
):
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = (pid_nh // H).to(tl.int64)  # int64: N*H*T*D may pass 2**31 for large batches
    h = (pid_nh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query positions
    offs_d = tl.arange(0, D)  # [D]
    offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m_valid = offs_m < TQ

    q_ptrs = Q + n * sqn + h * sqh + offs_m[:, None] * sqt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_valid[:, None], other=0.0)  # [BLOCK_M, D]
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + n * skn + h * skh
    v_base = V + n * svn + h * svh

    # A large finite start for the running max keeps exp2(m_old - m_new) finite when a band block holds no key
    # for some query row (all its scores are -inf): alpha = 1, p = 0, nothing changes.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    if BAND:
        # keys any query of this block can see: [first - W, last + W]; everything else is skipped, not masked
        lo = tl.maximum(pid_m * BLOCK_M - WINDOW, 0)
        hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M + WINDOW, TK)
    else:
        lo = 0
        hi = TK

    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # [BLOCK_N] key positions
        n_valid = cols < hi
        k = tl.load(k_base + cols[:, None] * skt + offs_d[None, :], mask=n_valid[:, None], other=0.0)  # [BLOCK_N, D]
        v = tl.load(v_base + cols[:, None] * svt + offs_d[None, :], mask=n_valid[:, None], other=0.0)  # [BLOCK_N, D]
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_M, BLOCK_N] fp32
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        valid = n_valid[None, :]
        if BAND:
            dist = offs_m[:, None] - cols[None, :]
            valid = valid & (dist <= WINDOW) & (dist >= -WINDOW)
        s = tl.where(valid, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [BLOCK_M]
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [BLOCK_M, BLOCK_N] fp32; masked entries are exactly 0
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        # p is rounded to the value dtype for the second dot so that it runs on tensor cores for fp16/bf16
        if RTNE_BF16:
            pv = _rtne_bf16(p)
        else:
            pv = p.to(V.dtype.element_ty)
        if UPCAST:
            pv = pv.to(tl.float32)
        if IEEE:
            acc = tl.dot(pv, v, acc, input_precision="ieee")
        else:
            acc = tl.dot(pv, v, acc)
        m_i = m_new

    # only rows past TQ can end with l = 0 (a real row sees at least its own key); they are not stored: avoid 0/0
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    o_ptrs = Out + n * son + h * soh + offs_m[:, None] * sot + offs_d[None, :]
    if RTNE_BF16:
        out = _rtne_bf16(out)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_valid[:, None])


# triton decides at decoration time (TRITON_INTERPRET=1 when this module was imported) whether kernels are compiled
# for the GPU or run by its numpy interpreter on any tensors; the launcher follows what was decided.
INTERPRETED = not isinstance(_attn_fwd, JITFunction)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> None:
    """Raise TypeError/ValueError saying what to change; the kernel itself trusts its inputs."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D [N, H, T, D], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"attention: {name} has dtype {t.dtype}; cast to float32, float16 or bfloat16")
        if t.stride(-1) != 1:
            raise ValueError(f"attention: {name} must be contiguous in its last (head) dim, got strides "
                             f"{t.stride()}; call .contiguous() first")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device}); "
                         "move them to one device")
    if q.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"attention: Triton kernels need CUDA tensors, got {q.device}; use engine.ops.attention on "
                         "CPU or set TRITON_INTERPRET=1 before importing triton (slow, for tests)")
    N, H, _, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != N or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in N, H and D")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"attention: head dim {D} is not supported (use one of {SUPPORTED_HEAD_DIMS}, "
                         "or engine.ops.attention)")
    if k.shape[2] == 0 and q.shape[2] > 0:
        raise ValueError("attention: k/v have no keys (Tk = 0): every output row would be undefined")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"attention: window must be an int or None, got {type(window).__name__}")
        if window < 0:
            raise ValueError(f"attention: window must be >= 0 (|q - k| <= window), got {window}")
        if k.shape[2] != q.shape[2]:
            raise ValueError(f"attention: a band (window={window}) is self-attention and needs Tq == Tk, got "
                             f"Tq={q.shape[2]}, Tk={k.shape[2]}; pass window=None for cross-attention")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(D); full when `window` is None, else only keys with |q - k| <= window.

    q [N, H, Tq, D], k/v [N, H, Tk, D] -> [N, H, Tq, D] in q's dtype (fp32 accumulation). Same semantics as
    `engine.ops.attention` (= `attention_ref`). D in SUPPORTED_HEAD_DIMS; any strides with a contiguous last dim.
    """
    _check(q, k, v, window)
    N, H, TQ, D = q.shape
    TK = k.shape[2]
    o = torch.empty((N, H, TQ, D), dtype=q.dtype, device=q.device)
    if o.numel() == 0:
        return o
    band = window is not None and window < TK - 1  # a band as wide as the sequence is full attention
    if band:
        # the band spans BLOCK_M + 2W keys: small key blocks waste little of the last one
        block_m, block_n = 64, 16 if window <= 8 else 32
    else:
        block_m = 64
        # cross-attention over a short text: one key block of at least L keys (tl.dot needs >= 16)
        block_n = min(64, max(16, triton.next_power_of_2(TK)))
        if q.dtype == torch.float32 and D > 64:
            block_n = min(block_n, 32)  # fp32 D=128 with 64-key blocks needs 115 KB of shared memory
    # The interpreter's tl.dot multiplies bf16 as raw uint16 bits (triton 3.9), so it gets fp32 copies there;
    # bf16*bf16 products are exact in fp32, so this is the same arithmetic as the GPU's bf16 dot.
    upcast = q.dtype == torch.float32 or (INTERPRETED and q.dtype == torch.bfloat16)
    grid = (triton.cdiv(TQ, block_m), N * H)
    _attn_fwd[grid](
        q, k, v, o,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        H, TQ, TK, window if band else 0,
        _LOG2E / math.sqrt(D),
        D=D, BLOCK_M=block_m, BLOCK_N=block_n, BAND=band, UPCAST=upcast, IEEE=q.dtype == torch.float32,
        RTNE_BF16=INTERPRETED and q.dtype == torch.bfloat16,
        num_warps=4 if D <= 64 else 8, num_stages=2,
        enable_fp_fusion=True,  # FMAs are fine here (tolerance, not bit-equality); explicit = no triton 3.9 warning
    )
    return o
