"""`--backend triton` (kernels.apply) reproduces the reference tokens through the Triton interpreter on CPU."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import run_settings
from magnet_engine.engine.cli import main
from magnet_engine.engine.model import SelfAttention
from magnet_engine.kernels.backend import apply as triton_apply
from test_cli import cli_args

import magnet_engine as me


@pytest.fixture(scope="module")
def tiny_triton(fixture_dir):
    return triton_apply(me.load(fixture_dir, device="cpu"))


def test_apply_swaps_ops(tiny_triton):
    from magnet_engine.kernels.backend import fastest_attention
    from magnet_engine.kernels.sampling import sample

    attends = [m.attend for m in tiny_triton.lm.modules() if isinstance(m, SelfAttention)]
    assert attends and all(a is fastest_attention for a in attends)
    assert tiny_triton.sample is sample


@pytest.mark.parametrize("run", ["gen_stride1", "gen_continuation"])
def test_triton_engine_token_exact(tiny_triton, settings, expected, run):
    import torch

    prompt = torch.from_numpy(expected["prompt_codes"]) if run == "gen_continuation" else None
    out = tiny_triton.generate(settings["prompts"], prompt_codes=prompt, **run_settings(settings, run))
    np.testing.assert_array_equal(out.codes.numpy(), expected[run])


def test_triton_engine_unguided_matches_torch(tiny_triton, tiny, settings):
    """Guidance 1: the loop runs B rows (cond passed as uncond too); the kernels must agree with torch on that path."""
    kw = {**run_settings(settings, "gen_stride1"), "cfg": (1.0,)}
    want = tiny.generate(settings["prompts"], **kw).codes
    np.testing.assert_array_equal(tiny_triton.generate(settings["prompts"], **kw).codes.numpy(), want.numpy())


def test_cli_backend_triton(fixture_dir, settings, expected, tmp_path):
    tokens = tmp_path / "t.npy"
    rc = main(["generate", *settings["prompts"], "--backend", "triton", "--device", "cpu", "--model",
               str(fixture_dir), "-o", str(tmp_path / "o"), "--tokens-out", str(tokens), "--quiet",
               *cli_args(run_settings(settings, "gen_nonoverlap_prod"))])
    assert rc == 0
    np.testing.assert_array_equal(np.load(tokens), expected["gen_nonoverlap_prod"])


def test_deterministic_linears_run_the_fixed_tile_gemm(fixture_dir, tiny, monkeypatch):
    """kernels.apply makes deterministic mode's row-invariant linear the Triton GEMM (`kernels.matmul`; the
    interpreter here, compiled on CUDA), whether the engine turned deterministic before or after: every projection
    of every layer and the head of every pass go through the kernel, and a greedy request gets the tokens of the
    torch engine's `invariant_linear` (a short one: the interpreter pays per tile)."""
    from collections import Counter

    import magnet_engine.kernels.matmul as kmm
    import torch.nn.functional as F
    from magnet_engine.kernels.backend import fastest_invariant_linear

    eng = triton_apply(me.load(fixture_dir, device="cpu", deterministic=True))
    assert eng.deterministic and eng.lm.linear is fastest_invariant_linear
    later = triton_apply(me.load(fixture_dir, device="cpu", deterministic=False))
    assert not later.deterministic and later.lm.linear is F.linear
    assert later.set_deterministic(True).deterministic and later.lm.linear is fastest_invariant_linear
    assert not later.set_deterministic(False).deterministic and later.lm.linear is F.linear

    calls: Counter = Counter()
    kernel = kmm.invariant_matmul

    def counted(x, weight):
        calls[tuple(weight.shape)] += 1
        return kernel(x, weight)

    monkeypatch.setattr(kmm, "invariant_matmul", counted)
    kw = dict(greedy=True, steps=(2, 1, 1, 1), duration=0.2, cfg=(3.0, 1.0))
    assert tiny.deterministic
    np.testing.assert_array_equal(eng.generate(["slow sad piano"], **kw).codes.numpy(),
                                  tiny.generate(["slow sad piano"], **kw).codes.numpy())
    lm, layers = eng.lm, len(eng.lm.layers)
    layer, passes = lm.layers[0], calls[tuple(lm.linears[0].weight.shape)]  # one head GEMM per pass
    assert passes == 5 and calls == {
        tuple(layer.self_attn.in_proj_weight.shape): passes * layers,
        (lm.cfg.dim, lm.cfg.dim): 3 * passes * layers,  # self out_proj, cross q, cross out_proj
        tuple(layer.linear1.weight.shape): passes * layers,
        tuple(layer.linear2.weight.shape): passes * layers,
        tuple(lm.linears[0].weight.shape): passes,
    }, calls
