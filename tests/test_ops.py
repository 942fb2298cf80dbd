"""engine.ops: the torch path's attention (the reference of kernels.attention)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from magnet_engine.engine.ops import BAND_BLOCK, band_attention, band_blocks, band_mask


@pytest.mark.parametrize("t", [1, 7, BAND_BLOCK, 498, 500, 1500])
@pytest.mark.parametrize("window", [0, 5, 40])
def test_band_attention_is_dense_attention_under_the_band_mask(t, window):
    g = torch.Generator().manual_seed(t + window)
    n, h = (2, 3) if t < 1000 else (1, 1)
    q, k, v = (torch.randn(n, h, t, 32, generator=g, dtype=torch.float64) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(t, window))
    # float64: both sides round at ~1e-16, so any difference above that is a wrong key or a wrong weight
    torch.testing.assert_close(band_attention(q, k, v, window), dense, rtol=1e-12, atol=1e-12)


def test_the_band_blocks_are_made_once_per_shape():
    cpu = torch.device("cpu")
    a = band_blocks(498, 5, cpu)
    assert a is band_blocks(498, 5, cpu) and band_blocks(500, 5, cpu) is not a
    assert a.shape == (-(-498 // BAND_BLOCK), BAND_BLOCK, BAND_BLOCK + 10)
    assert a.any(-1).all(), "every query row, padded ones included, attends to some key"
