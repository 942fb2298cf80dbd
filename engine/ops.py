"""Attention in plain PyTorch: the reference for `kernels.attention` and the CPU/torch path of the model.

Shapes: N rows of the batch (2B under guidance), H heads, Tq queries, Tk keys, D head dim.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

# Queries per block of the banded path. A block attends to its own span plus `window` keys either side, so the
# work is ~T·(16+2W) instead of T²: 3x faster than SDPA with a dense band mask at T = 500, W = 5 on 2 CPU cores;
# blocks of 8-16 are best there (`python -m magnet_engine.bench band`, bench/RESULTS.md).
BAND_BLOCK = 16


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(D); full when `window` is None, else only keys with |q-k| <= window.

    q [N, H, Tq, D], k/v [N, H, Tk, D] -> [N, H, Tq, D]. The band needs Tq == Tk (self-attention).
    """
    if window is None:
        return F.scaled_dot_product_attention(q, k, v)
    return band_attention(q, k, v, window)


def band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """|q - k| <= window attention without a [T, T] mask: queries in blocks of BAND_BLOCK, each against the
    BAND_BLOCK + 2·window keys around it (key blocks outside the band are never touched).

        keys    ....[ W | block | W ]....
        queries      [  block  ]
    """
    N, H, T, D = q.shape
    assert k.shape[2] == T, "band attention is self-attention: Tq must equal Tk"
    bq, w = BAND_BLOCK, window
    nb = -(-T // bq)
    tp = nb * bq
    qb = F.pad(q, (0, 0, 0, tp - T)).view(N, H, nb, bq, D)
    # unfold gives views [N, H, nb, D, bq+2w] -> [N, H, nb, bq+2w, D]
    kt = F.pad(k, (0, 0, w, tp - T + w)).unfold(2, bq + 2 * w, bq)  # [N, H, nb, D, bq+2w]: key blocks, transposed
    vb = F.pad(v, (0, 0, w, tp - T + w)).unfold(2, bq + 2 * w, bq).transpose(-1, -2)
    if q.dtype in (torch.float32, torch.float64):
        # SDPA's math path written out (its operations in its order, so the same bits), minus what a band never
        # needs: converting the boolean mask per call and guarding all-masked rows (no row is); 30% faster on CPU
        sf = math.sqrt(1.0 / math.sqrt(D))
        s = torch.matmul(qb * sf, kt * sf).add_(band_bias(T, w, q.device))  # [N, H, nb, bq, bq+2w]
        out = torch.matmul(torch.softmax(s, dim=-1), vb)  # [N, H, nb, bq, D]
    else:  # half precision: SDPA's own arithmetic
        out = F.scaled_dot_product_attention(qb, kt.transpose(-1, -2), vb, attn_mask=band_blocks(T, w, q.device))
    return out.reshape(N, H, tp, D)[:, :, :T]


def band_blocks(t: int, window: int, device: torch.device) -> torch.Tensor:
    """The band of `band_attention`'s blocks, bool [nb, BAND_BLOCK, BAND_BLOCK + 2·window] (True = attend), made
    once per shape: a pass's layers and a request's steps share it (building it per call cost about as much as the
    attention itself at T = 7, and ~20% at T = 498 on 2 CPU cores). Padded query rows (>= T) keep one valid key so
    that no row is all -inf (they are cut off). Made afresh while a CUDA graph is captured (a tensor made there
    belongs to the graph's memory pool)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return _band_blocks(t, window, device)
    return _cached_band_blocks(t, window, device)


def _band_blocks(t: int, window: int, device: torch.device) -> torch.Tensor:
    bq, w = BAND_BLOCK, window
    nb = -(-t // bq)
    qi = torch.arange(nb * bq, device=device).view(nb, bq, 1)
    kj = (torch.arange(nb, device=device) * bq - w).view(nb, 1, 1) + torch.arange(bq + 2 * w, device=device)
    return (((qi - kj).abs() <= w) & (kj >= 0) & (kj < t)) | ((qi >= t) & (kj == t - 1))


_cached_band_blocks = functools.lru_cache(maxsize=64)(_band_blocks)


def band_bias(t: int, window: int, device: torch.device) -> torch.Tensor:
    """`band_blocks` as an additive fp32 bias (0 = attend, -inf = not), as SDPA converts a boolean mask; cached the
    same way."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return _band_bias(t, window, device)
    return _cached_band_bias(t, window, device)


def _band_bias(t: int, window: int, device: torch.device) -> torch.Tensor:
    allowed = band_blocks(t, window, device)
    return torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, float("-inf"))


_cached_band_bias = functools.lru_cache(maxsize=64)(_band_bias)


def band_mask(t: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Dense boolean [T, T] band (True = attend); for tests and the ONNX graph only."""
    i = torch.arange(t, device=device)
    return (i[:, None] - i[None, :]).abs() <= window
