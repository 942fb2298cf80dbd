"""The engine against the reference implementation's own outputs (../shared/fixtures/magnet-tiny)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_settings

RUNS = ["gen_nonoverlap_max", "gen_nonoverlap_prod", "gen_stride1", "gen_cfg3_temp1", "gen_continuation"]


def test_text_embeddings_match(tiny, settings, expected):
    cond = tiny.text(settings["prompts"] + [None, None])
    np.testing.assert_allclose(cond.numpy(), expected["cond_embeds"], atol=1e-4, rtol=0)
    assert (cond[2:] == 0).all(), "the null condition must be exact zeros"


@pytest.mark.parametrize("stage", range(4))
def test_stage_logits_match(tiny, settings, expected, stage):
    codes = torch.from_numpy(expected["forward_codes"])
    cross = tiny.lm.cross_kv(tiny.text(settings["prompts"]))
    with torch.no_grad():
        logits = tiny.lm(torch.cat([codes, codes]), stage, cross)
    np.testing.assert_allclose(logits.numpy(), expected[f"forward_logits_stage{stage}"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("run", RUNS)
def test_generation_token_exact(tiny, settings, expected, run):
    prompt = torch.from_numpy(expected["prompt_codes"]) if run == "gen_continuation" else None
    out = tiny.generate(settings["prompts"], prompt_codes=prompt, **run_settings(settings, run))
    np.testing.assert_array_equal(out.codes.numpy(), expected[run])
    if run == "gen_continuation":
        np.testing.assert_array_equal(out.codes[..., :prompt.shape[-1]].numpy(), expected["prompt_codes"])


def test_guidance_one_runs_the_conditional_rows_only(tiny, settings, monkeypatch):
    """Guidance 1 at every step: uncond + 1·(cond − uncond) is cond, so each pass runs B rows, not [cond; uncond],
    and the tokens are those of the full guided computation."""
    kw = {**run_settings(settings, "gen_nonoverlap_max"), "cfg": (1.0,)}
    batch, rows = len(settings["prompts"]), []
    forward = tiny.lm.forward

    def counted(codes, stage, cross, frames=None):
        rows.append(codes.shape[0])
        return forward(codes, stage, cross, frames)

    monkeypatch.setattr(tiny.lm, "forward", counted)
    fast = tiny.generate(settings["prompts"], **kw).codes
    assert rows and set(rows) == {batch}
    make_step = tiny.make_step

    def always_guided(cond):
        step = make_step(cond)
        return lambda codes, stage, guided, frames=None: step(codes, stage, True, frames)

    monkeypatch.setattr(tiny, "make_step", always_guided)
    rows.clear()
    full = tiny.generate(settings["prompts"], **kw).codes
    assert set(rows) == {2 * batch}
    np.testing.assert_array_equal(fast.numpy(), full.numpy())


def test_decoded_audio_matches(tiny, expected):
    audio = tiny.decode(torch.from_numpy(expected["gen_nonoverlap_max"]))
    np.testing.assert_allclose(audio.numpy(), expected["decoded_wav"], atol=1e-4, rtol=0)


def test_encoded_tokens_match(tiny, expected):
    codes = tiny.encode(torch.from_numpy(expected["encode_wav"]))
    np.testing.assert_array_equal(codes.numpy(), expected["encode_codes"])


def test_text_cache_is_exact(tiny, settings):
    kw = run_settings(settings, "gen_nonoverlap_max")
    tiny.text.clear_cache()
    cold = tiny.text(settings["prompts"])
    warm = tiny.text(settings["prompts"])  # served from the cache
    assert torch.equal(cold, warm)
    tiny.text.cache_size, size = 0, tiny.text.cache_size
    try:
        tiny.text.clear_cache()
        uncached = tiny.generate(settings["prompts"], **kw).codes
    finally:
        tiny.text.cache_size = size
    assert torch.equal(uncached, tiny.generate(settings["prompts"], **kw).codes)


def test_text_cache_is_bounded(tiny):
    size = tiny.text.cache_size
    tiny.text.cache_size = 3
    try:
        tiny.text.clear_cache()
        for i in range(5):
            tiny.text([f"prompt {i}"])
        assert len(tiny.text._cache) == 3
    finally:
        tiny.text.cache_size = size


def test_padding_to_batch_maximum(tiny, settings):
    """No key mask in cross-attention: a prompt's embedding is padded to the batch's longest with zero rows."""
    short = tiny.text(["slow sad piano"])
    both = tiny.text(settings["prompts"])
    assert both.shape[1] > short.shape[1]
    assert torch.equal(both[1, : short.shape[1]], short[0])
    assert (both[1, short.shape[1]:] == 0).all()


def test_seeded_sampling_reproducible(tiny, settings):
    kw = {**run_settings(settings, "gen_nonoverlap_max"), "greedy": False}
    a = tiny.generate(settings["prompts"], seed=7, **kw).codes
    b = tiny.generate(settings["prompts"], seed=7, **kw).codes
    c = tiny.generate(settings["prompts"], seed=8, **kw).codes
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert int(a.max()) < 2048 and int(a.min()) >= 0, "no mask token may survive generation"


@pytest.mark.parametrize("mode", [dict(top_p=0.0, top_k=5), dict(top_p=0.0, top_k=0), dict(top_p=0.5)])
def test_sampling_modes_fill_every_position(tiny, settings, mode):
    kw = {**run_settings(settings, "gen_stride1"), "greedy": False, **mode}
    codes = tiny.generate(["a"], seed=0, **kw).codes
    assert codes.shape == (1, 4, 50) and int(codes.max()) < 2048


def test_unconditional_generation(tiny, settings):
    kw = run_settings(settings, "gen_nonoverlap_max")
    out = tiny.generate([None, None], **kw)
    assert out.codes.shape == (2, 4, 48)
    assert torch.equal(out.codes[0], out.codes[1]), "greedy unconditional samples are identical"


def test_bad_prompt_codes(tiny, settings):
    kw = run_settings(settings, "gen_nonoverlap_max")
    with pytest.raises(ValueError, match=r"\[0, 2048\)"):
        tiny.generate(["a"], prompt_codes=torch.full((1, 4, 3), 2048), **kw)
    with pytest.raises(TypeError, match="integers"):
        tiny.generate(["a"], prompt_codes=torch.zeros(1, 4, 3), **kw)
    with pytest.raises(ValueError, match=r"\[B, 4, P\]"):
        tiny.generate(["a"], prompt_codes=torch.zeros(1, 3, 3, dtype=torch.long), **kw)
    with pytest.raises(ValueError, match="shorter than the generation"):
        tiny.generate(["a"], prompt_codes=torch.zeros(1, 4, 48, dtype=torch.long), **kw)


@pytest.mark.parametrize("bad, match", [
    (dict(steps=(4, 2, 2)), "needs 4 values"), (dict(steps=(4, 0, 2, 2)), "positive"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=2049), "top_k"), (dict(temperature=-1.0), "temperature"),
    (dict(duration=2.0, context=1.0), "shorter than the model.s window"),
    (dict(span_arrangement="zigzag"), "span_arrangement"),
    (dict(cfg=(1.0, 2.0, 3.0)), "cfg"),
])
def test_bad_settings(tiny, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny.generate(["a"], **bad)
