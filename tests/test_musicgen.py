"""MusicGen's AR loop (engine.musicgen) against the reference's greedy tokens and its own invariants."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from magnet_engine.engine.config import GenerationConfig
from magnet_engine.engine.model import LM, CrossKV, merge_heads, split_qkv
from magnet_engine.engine.musicgen import UNKNOWN, ARDecoder, DelayPattern, generate_tokens_ar

FRAMES = 25  # the fixture's max_gen_len: 0.5 s at 50 Hz


@pytest.fixture(scope="module")
def mg(fixture_dir: Path):
    import magnet_engine as me

    return me.load(fixture_dir / "musicgen_state_dict.bin", device="cpu")


@pytest.fixture(scope="module")
def prompts(settings: dict) -> list[str]:
    return settings["musicgen"]["prompts"]


@pytest.fixture(scope="module")
def gen_greedy(fixture_dir: Path) -> np.ndarray:
    with np.load(fixture_dir / "expected_musicgen.npz") as f:
        return f["gen_greedy"]


def greedy(mg, prompts, frames: int = FRAMES, **kw) -> torch.Tensor:
    return mg.generate(prompts, greedy=True, cfg=(3.0,), duration=frames / 50, decode=False, **kw).codes


def test_fixture_loads_as_musicgen(mg, settings):
    assert mg.config.kind == "musicgen" and mg.config.delays == (0, 1, 2, 3)
    assert settings["musicgen"]["max_gen_len"] == FRAMES and settings["musicgen"]["cfg_coef"] == 3.0


def test_greedy_matches_reference(mg, prompts, gen_greedy):
    np.testing.assert_array_equal(greedy(mg, prompts).numpy(), gen_greedy)


def test_delay_pattern_layout():
    pat = DelayPattern((0, 1, 2, 3), 3)
    codes = torch.arange(12).view(1, 4, 3) + 100  # codebook k, frame t -> 100 + 3k + t
    seq = pat.build(codes, special=-9)
    s = -9
    want = [[s, 100, 101, 102, s, s, s],
            [s, s, 103, 104, 105, s, s],
            [s, s, s, 106, 107, 108, s],
            [s, s, s, s, 109, 110, 111]]
    assert seq[0].tolist() == want and pat.steps == 7
    assert torch.equal(pat.revert(seq), codes)
    assert pat.first_step(0) == 1 and pat.first_step(2) == 3


def full_causal_logits(lm: LM, seq: torch.Tensor, cross: CrossKV) -> torch.Tensor:
    """Plain causal forward over the whole sequence, no cache: seq [B, K, S] -> logits [2B, K, S, V]."""
    x = lm.embed(seq).to(lm.dtype)
    x = torch.cat([x, x])
    for layer, kv in zip(lm.layers, cross):
        sa = layer.self_attn
        q, k, v = split_qkv(F.linear(layer.norm1(x), sa.in_proj_weight), sa.num_heads)
        x = x + sa.out_proj(merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True)))
        b, ca = kv[0].shape[0], layer.cross_attention  # text on the first B rows; the null text's is exactly 0
        q = F.linear(layer.norm_cross(x[:b]), ca.in_proj_weight[:x.shape[-1]])
        q = q.view(b, q.shape[1], ca.num_heads, -1).transpose(1, 2)
        x = torch.cat([x[:b] + ca.out_proj(merge_heads(F.scaled_dot_product_attention(q, *kv))), x[b:]])
        x = x + layer.linear2(F.gelu(layer.linear1(layer.norm2(x))))
    h = lm.out_norm(x.float())
    return torch.stack([lin(h) for lin in lm.linears], dim=1)


@torch.no_grad()
def test_static_cache_matches_full_forward(mg, prompts, gen_greedy):
    lm = mg.lm
    pattern = DelayPattern(lm.cfg.delays, FRAMES)
    seq = pattern.build(torch.from_numpy(gen_greedy), lm.cfg.card)[..., :-1]  # [B, K, S-1]: every input column
    cross = lm.cross_kv(mg.text(prompts))
    want = full_causal_logits(lm, seq, cross)  # [2B, K, S-1, V]
    n = seq.shape[-1]
    dec = ARDecoder(lm, cross, 2, n)
    got = []
    for pos in range(n):
        c, u = dec.step(seq[..., pos:pos + 1], torch.tensor(pos))
        got.append(torch.cat([c, u]))
    torch.testing.assert_close(torch.stack(got, dim=2), want, atol=1e-5, rtol=0)
    # a prefill of several positions, then single steps, gives the same numbers
    dec = ARDecoder(lm, cross, 2, n)
    c, u = dec.step(seq[..., :7], torch.tensor(0))
    torch.testing.assert_close(torch.cat([c, u]), want[:, :, 6], atol=1e-5, rtol=0)
    c, u = dec.step(seq[..., 7:8], torch.tensor(7))
    torch.testing.assert_close(torch.cat([c, u]), want[:, :, 7], atol=1e-5, rtol=0)


def test_batch_consistency(mg, prompts):
    # the reference pads text to the batch's longest prompt with no key mask, so only same-length text is comparable
    alone = greedy(mg, prompts[1:], frames=12)
    both = greedy(mg, [prompts[1], prompts[1]], frames=12)
    assert torch.equal(both[0], alone[0]) and torch.equal(both[1], alone[0])
    first = greedy(mg, prompts[:1], frames=12)
    mixed = greedy(mg, [prompts[0], None], frames=12)  # None is the zero condition: shorter text is no issue
    assert torch.equal(mixed[:1], first)


def test_seeded_sampling_reproducible(mg, prompts):
    kw = {"duration": 0.3, "seed": 1234, "decode": False}  # defaults: sampling, top-k 250, temperature 1, cfg 3
    a = mg.generate(prompts, **kw).codes
    b = mg.generate(prompts, **kw).codes
    c = mg.generate(prompts, **{**kw, "seed": 4321}).codes
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (2, 4, 15) and int(a.min()) >= 0 and int(a.max()) < mg.config.card


@pytest.mark.parametrize("p", [1, 10, 24])
def test_continuation_keeps_prompt_and_matches_greedy(mg, prompts, gen_greedy, p):
    # greedy decoding of the reference's own first p frames must continue into the reference's output
    prompt = torch.from_numpy(gen_greedy[..., :p]).clone()
    out = greedy(mg, prompts, prompt_codes=prompt)
    np.testing.assert_array_equal(out[..., :p].numpy(), prompt.numpy())
    np.testing.assert_array_equal(out.numpy(), gen_greedy)


def test_continuation_sampling_keeps_prompt(mg, prompts):
    prompt = torch.randint(0, mg.config.card, (2, 4, 6), generator=torch.Generator().manual_seed(0))
    out = mg.generate(prompts, prompt_codes=prompt, duration=0.3, seed=0, decode=False).codes
    assert torch.equal(out[..., :6], prompt) and (out != UNKNOWN).all()


def test_prompt_too_long_and_progress(mg, prompts):
    with pytest.raises(ValueError, match="shorter than the generation"):
        greedy(mg, prompts, frames=5, prompt_codes=torch.zeros(2, 4, 5, dtype=torch.long))
    seen: list[tuple[int, int]] = []
    cond = mg.text(prompts)
    gen = GenerationConfig(greedy=True, cfg=(3.0,), duration=0.1)
    codes = generate_tokens_ar(mg.lm, cond, gen, 2, torch.device("cpu"), progress=lambda i, n: seen.append((i, n)))
    assert codes.shape == (2, 4, 5)
    assert seen == [(i, 8) for i in range(1, 9)]  # S - 1 = 5 + 3 steps
