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


@pytest.mark.parametrize("n,h,t", [(1, 4, 498), (2, 4, 7), (16, 4, 50), (1, 2, 1)])
def test_band_attention_in_fp32_is_sdpa_on_the_blocks_bit_for_bit(n, h, t):
    """The fp32 path writes SDPA's math path out (minus its per-call mask conversion and all-masked-row guard): the
    same bits as SDPA given the same blocks and boolean mask, so the tokens are those of the SDPA formulation."""
    g = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(n, h, t, 64, generator=g) for _ in range(3))
    w, bq = 5, BAND_BLOCK
    nb = -(-t // bq)
    qb = F.pad(q, (0, 0, 0, nb * bq - t)).view(n, h, nb, bq, 64)
    kb, vb = (F.pad(x, (0, 0, w, nb * bq - t + w)).unfold(2, bq + 2 * w, bq).transpose(-1, -2) for x in (k, v))
    sdpa = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=band_blocks(t, w, torch.device("cpu")))
    assert torch.equal(band_attention(q, k, v, w), sdpa.reshape(n, h, nb * bq, 64)[:, :, :t])
