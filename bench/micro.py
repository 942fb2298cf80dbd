"""Step-function micro-benchmarks (pytest-benchmark) on the tiny preset's shapes (dim 64, 4 heads, 2 layers, card
2048, K = 4) at a 10 s segment (T = 500 frames), batch 1 under guidance (2 rows):

    python -m pytest bench/micro.py --benchmark-only

The file is not named test_*.py, so the default test run never collects it. What is timed:
- one MAGNeT step: LM pass over codes [1, 4, 500] (as [cond; uncond]) for stage 0 (full attention) and stage 1
  (banded ±5 attention), logits [1, 500, 2048] x2;
- one AR step: one frame [1, 4, 1] against a 503-position KV cache, logits [1, 4, 2048] x2;
- one MAGNeT sampling step: guidance + temperature + top-p + draw over [1, 500, 2048].
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from magnet_engine.bench.presets import get_preset, random_lm  # noqa: E402
from magnet_engine.engine.api import TorchStep  # noqa: E402 - after the skip guard
from magnet_engine.engine.sampling import StepSampling, sample_ref  # noqa: E402

FRAMES = 500  # 10 s at 50 Hz
TEXT_LEN = 12
CPU = torch.device("cpu")


def _cond(dim: int) -> torch.Tensor:
    return torch.randn(1, TEXT_LEN, dim, generator=torch.Generator().manual_seed(0)) * 0.1  # [B, L, dim]


@pytest.fixture(scope="module")
def magnet_step() -> Any:
    cfg = get_preset("tiny").model_config("magnet")
    lm = random_lm(cfg, CPU, torch.float32)
    return TorchStep(lm)(_cond(cfg.dim))


@pytest.fixture(scope="module")
def ar_decoder() -> Any:
    from magnet_engine.engine.musicgen import ARDecoder

    cfg = get_preset("tiny").model_config("ar")
    lm = random_lm(cfg, CPU, torch.float32)
    return ARDecoder(lm, lm.cross_kv(_cond(cfg.dim)), batch=1, max_len=FRAMES + max(cfg.delays))


@pytest.mark.parametrize("stage", [0, 1], ids=["stage0-full", "stage1-band"])
def test_magnet_step(benchmark: Any, magnet_step: Any, stage: int) -> None:
    codes = torch.randint(0, 2048, (1, 4, FRAMES))
    codes[:, stage:] = 2048  # this stage and later ones still masked, as during decoding
    cond, uncond = benchmark(torch.no_grad()(magnet_step), codes, stage)
    assert cond.shape == (1, FRAMES, 2048) and torch.isfinite(cond).all()


def test_ar_step(benchmark: Any, ar_decoder: Any) -> None:
    tokens = torch.randint(0, 2048, (1, 4, 1))
    pos = torch.tensor(FRAMES // 2)  # a mid-sequence frame: the mask spans the whole static cache anyway
    cond, uncond = benchmark(torch.no_grad()(ar_decoder.step), tokens, pos)
    assert cond.shape == (1, 4, 2048) and torch.isfinite(cond).all()


def test_magnet_sample(benchmark: Any) -> None:
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 1, FRAMES, 2048, generator=g)
    current = torch.full((1, FRAMES), 2048)
    uniform = torch.rand(1, FRAMES, generator=g)
    params = StepSampling(cfg_coef=3.0, temperature=3.0, top_k=0, top_p=0.9, greedy=False)
    tokens, probs = benchmark(sample_ref, cond, uncond, current, 2048, params, uniform)
    assert tokens.shape == (1, FRAMES) and bool((tokens < 2048).all())
