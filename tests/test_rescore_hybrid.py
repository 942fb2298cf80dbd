"""The paper's quality levers on the fixture: AR rescoring (engine.rescore) and Hybrid-MAGNeT (engine.hybrid).

The fixture's MAGNeT and MusicGen share codec, T5, card and n_q, so the MusicGen checkpoint serves as rescorer and
as hybrid AR model. Weights are random: these tests check the mechanics (exactness, determinism, batching, errors),
not quality.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_settings
from magnet_engine.engine import magnet
from magnet_engine.engine.api import Engine
from magnet_engine.engine.cli import main
from magnet_engine.engine.masking import DONT_REMASK
from magnet_engine.engine.model import LM
from magnet_engine.engine.rescore import ARRescorer, build_rescorer

PREFIX = 0.3  # seconds -> 15 frames of the 48 that MAGNeT returns for 1 s


@pytest.fixture(scope="module")
def mg(fixture_dir: Path):
    import magnet_engine as me

    return me.load(fixture_dir / "musicgen_state_dict.bin", device="cpu")


@pytest.fixture(scope="module")
def kw(settings: dict) -> dict:
    """The fixture's greedy settings: steps (4, 2, 2, 2), duration 1.0, nonoverlap / max."""
    return {**run_settings(settings, "gen_nonoverlap_max"), "decode": False}


def random_engine(base: Engine, **changes) -> Engine:
    """An engine whose LM has a modified config and random weights (never run: refused before)."""
    cfg = dataclasses.replace(base.config, **changes)
    return Engine(cfg, base.text, base.codec, base.device, lm=LM(cfg).eval())


@torch.no_grad()
def test_rescorer_is_teacher_forced_ar(mg, settings, fixture_dir):
    """On MusicGen's own greedy tokens (cfg 3), every token is the argmax of the rescorer's guided distribution:
    the delay alignment, causal prefill and guidance match the AR loop."""
    with np.load(fixture_dir / "expected_musicgen.npz") as f:
        codes = torch.from_numpy(f["gen_greedy"])  # [B, K, 25]
    rescorer = ARRescorer(mg, settings["musicgen"]["prompts"], codes.shape[-1], cfg_coef=3.0)
    for stage in range(codes.shape[1]):
        probs = rescorer.probs(codes, stage)  # [B, T, V]
        assert torch.equal(probs.argmax(-1), codes[:, stage])
        torch.testing.assert_close(rescorer(codes, stage), probs.max(-1).values)
    assert len(rescorer.timer.seconds()) == codes.shape[1]


def test_weight_one_is_plain_magnet(tiny, mg, settings, expected, kw):
    out = tiny.generate(settings["prompts"], rescorer=mg, rescore_weight=1.0, **kw)
    np.testing.assert_array_equal(out.codes.numpy(), expected["gen_nonoverlap_max"])
    # one AR forward per step whose scores are read: every step but each stage's last
    assert out.stats["rescore_calls"] == sum(kw["steps"]) - len(kw["steps"])
    assert out.stats["rescore_s_per_step"] > 0


def test_rescored_greedy_deterministic_and_live(tiny, mg, settings, expected, kw):
    a = tiny.generate(settings["prompts"], rescorer=mg, rescore_weight=0.0, **kw).codes
    b = tiny.generate(settings["prompts"], rescorer=mg, rescore_weight=0.0, **kw).codes
    assert torch.equal(a, b)
    assert not np.array_equal(a.numpy(), expected["gen_nonoverlap_max"]), "W = 0 must change the re-mask order"


@torch.no_grad()
def test_rescore_mix_is_the_weighted_sum(tiny, mg, settings, kw):
    """Between the two ends (W = 0.3): after every step whose scores are read, each span's score is that of
    W·p_magnet + (1 − W)·p_ar, mixed here by hand from the sampler's probabilities and the AR model's (max scoring:
    1 − the span's highest probability); the loop driven here is Engine.generate's."""
    w, prompts = 0.3, settings["prompts"]
    req = tiny.request(prompts, rescorer=mg, rescore_weight=w, **{k: v for k, v in kw.items() if k != "decode"})
    assert req.gen.span_scoring == "max" and req.gen.span_arrangement == "nonoverlap"
    rescorer = build_rescorer(tiny.config, req.rescorer, prompts, req.gen)
    p_ar: list[torch.Tensor] = []
    p_magnet: list[torch.Tensor] = []

    def rescore(codes: torch.Tensor, stage: int) -> torch.Tensor:
        p_ar.append(rescorer(codes, stage))
        return p_ar[-1]

    def sample(*args):  # noqa: ANN002, ANN202 - magnet.Sampler's arguments, passed through
        tokens, probs = tiny.sample(*args)
        p_magnet.append(dec.spread(tokens, probs)[1])  # [B, T]: on a CPU the step samples the re-masked frames only
        return tokens, probs

    batch = len(prompts)
    dec = magnet.Decoding(tiny.config, req.gen, batch, tiny.device, None,
                          magnet.row_generators(req.gen.seed, batch, tiny.device), rescore,
                          tiny.make_step(tiny.text(prompts)))
    checked = 0
    while not dec.finished:
        read = len(p_ar)
        magnet.decode_step(magnet.each_alone, sample, [dec])
        if len(p_ar) > read:
            mix = w * p_magnet[-1] + (1 - w) * p_ar[-1]  # [B, T]
            want = 1 - mix.reshape(batch, -1, tiny.config.span_len).amax(-1)  # [B, T / span]
            torch.testing.assert_close(dec.scores, want.masked_fill(~dec.chunks, DONT_REMASK))
            checked += 1
    assert checked == sum(kw["steps"]) - len(kw["steps"])  # every step but each stage's last
    assert torch.equal(dec.codes, tiny.generate(prompts, rescorer=mg, rescore_weight=w, **kw).codes)


def test_hybrid_prefix_is_the_ar_generation(tiny, mg, settings, kw):
    calls: list[tuple[int, int]] = []
    out = tiny.generate(settings["prompts"], ar_model=mg, hybrid_prefix=PREFIX,
                        progress=lambda d, t: calls.append((d, t)), **kw)
    p = round(PREFIX * 50)
    ar = mg.generate(settings["prompts"], greedy=True, duration=PREFIX, decode=False).codes  # [B, K, P]
    assert out.codes.shape == (2, 4, 48) and ar.shape[-1] == p
    assert torch.equal(out.codes[..., :p], ar), "the prefix is fixed in all codebooks"
    assert int(out.codes.max()) < 2048
    assert torch.equal(out.codes, tiny.generate(settings["prompts"], ar_model=mg, hybrid_prefix=PREFIX, **kw).codes)
    assert out.stats["hybrid_prefix_frames"] == p and out.stats["hybrid_prefix_s"] > 0
    total = calls[-1][1]
    assert [d for d, _ in calls] == list(range(1, total + 1)) and {t for _, t in calls} == {total}
    assert total == p + 3 + sum(kw["steps"])  # AR steps (P + max delay) then MAGNeT's


def test_hybrid_sampled_seeded(tiny, mg, settings, kw):
    """Sampled: the prefix is the AR model's own sampled run with the request's seed (its defaults: temperature 1,
    top-k 250, cfg 3), and the whole request reproduces."""
    sk = {**kw, "greedy": False, "seed": 3}
    a = tiny.generate(settings["prompts"], ar_model=mg, hybrid_prefix=PREFIX, rescorer=mg, **sk).codes
    b = tiny.generate(settings["prompts"], ar_model=mg, hybrid_prefix=PREFIX, rescorer=mg, **sk).codes
    assert torch.equal(a, b) and int(a.max()) < 2048
    ar = mg.generate(settings["prompts"], seed=3, duration=PREFIX, decode=False).codes
    assert torch.equal(a[..., :ar.shape[-1]], ar)


@pytest.mark.parametrize("lever", ["rescore", "hybrid"])
def test_batch_agreement(tiny, mg, settings, kw, lever):
    """Identical prompts (the text padding is the same) give the same tokens alone or batched."""
    extra = dict(rescorer=mg, rescore_weight=0.0) if lever == "rescore" else dict(ar_model=mg, hybrid_prefix=PREFIX)
    prompt = settings["prompts"][1]
    one = tiny.generate([prompt], **extra, **kw).codes
    two = tiny.generate([prompt] * 2, **extra, **kw).codes
    assert torch.equal(two[0], one[0]) and torch.equal(two[1], one[0])


@pytest.mark.parametrize("make, extra, match", [
    (lambda t, m: random_engine(m, card=1024), "rescorer", "card=1024"),
    (lambda t, m: random_engine(m, n_q=3, delays=(0, 1, 2)), "rescorer", "n_q=3"),
    (lambda t, m: random_engine(m, frame_rate=25), "ar_model", "frame_rate=25"),
    (lambda t, m: t, "rescorer", "must be an autoregressive"),
    (lambda t, m: t, "ar_model", "must be an autoregressive"),
])
def test_bad_companions(tiny, mg, kw, make, extra, match):
    args = {extra: make(tiny, mg)}
    if extra == "ar_model":
        args["hybrid_prefix"] = PREFIX
    with pytest.raises(ValueError, match=match):
        tiny.generate(["a"], **args, **kw)


@pytest.mark.parametrize("bad, match", [
    (dict(rescore_weight=1.5), r"rescore_weight must be in \[0, 1\]"),
    (dict(rescore_weight=-0.1), r"rescore_weight must be in \[0, 1\]"),
    (dict(hybrid_prefix=1.0), "must be shorter than duration"),
    (dict(hybrid_prefix=0.97), "must be shorter than the generation"),  # 48 frames after nonoverlap trimming
    (dict(hybrid_prefix=-1.0), "must be >= 0"),
    (dict(hybrid_prefix=0.001), "shorter than one frame"),
])
def test_bad_hybrid_or_weight(tiny, mg, kw, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny.generate(["a"], ar_model=mg, rescorer=mg, **{**kw, **bad})


def test_levers_need_their_model(tiny, mg, kw):
    with pytest.raises(ValueError, match="hybrid_prefix needs ar_model, the AR model"):
        tiny.generate(["a"], hybrid_prefix=PREFIX, **kw)
    with pytest.raises(ValueError, match="ar_model is used only by the hybrid"):
        tiny.generate(["a"], ar_model=mg, **kw)
    with pytest.raises(ValueError, match="rescore_weight needs rescorer"):
        tiny.generate(["a"], rescore_weight=0.3, **kw)
    with pytest.raises(ValueError, match="works with a MAGNeT model"):
        mg.generate(["a"], rescorer=mg, duration=0.1, decode=False)


def test_cli_hybrid_and_rescore(tiny, mg, fixture_dir, settings, tmp_path):
    """`magnet generate` with both levers (--deterministic, as `tiny`; weight 0, not the default 0.5, so a dropped
    --rescore-weight shows): the API's tokens for the same settings."""
    tokens = tmp_path / "t.npy"
    musicgen = str(fixture_dir / "musicgen_state_dict.bin")
    rc = main(["generate", settings["prompts"][1], "--model", str(fixture_dir), "--device", "cpu", "--greedy",
               "--steps", "4,2,2,2", "--ar-model", musicgen, "--hybrid-prefix", str(PREFIX), "--rescorer", musicgen,
               "--rescore-weight", "0", "--ar-cfg", "3", "-o", str(tmp_path / "o.wav"), "--tokens-out",
               str(tokens), "--deterministic", "--quiet"])
    assert rc == 0 and (tmp_path / "o.wav").exists()
    want = tiny.generate(settings["prompts"][1:2], greedy=True, steps=(4, 2, 2, 2), ar_model=mg, hybrid_prefix=PREFIX,
                         rescorer=mg, rescore_weight=0.0, ar_cfg=3.0, decode=False).codes
    assert want.shape == (1, 4, 48)
    np.testing.assert_array_equal(np.load(tokens), want.numpy())


@pytest.mark.parametrize("argv, match", [
    (["--rescore-weight", "1.5"], "--rescore-weight must be in [0, 1]"),
    (["--rescore-weight", "0.3"], "--rescore-weight needs --rescorer"),
    (["--hybrid-prefix", "0.3"], "--hybrid-prefix needs --ar-model"),
    (["--ar-model", "{mg}"], "--ar-model is used only by the hybrid"),
    (["--ar-model", "{mg}", "--hybrid-prefix", "0.5", "--duration", "0.5"], "shorter than --duration"),
    (["--ar-model", "{mg}", "--hybrid-prefix", "0.98"], "must be shorter than the generation"),
    (["--rescorer", "{magnet}"], "must be an autoregressive"),
    (["--ar-model", "{magnet}", "--hybrid-prefix", "0.3"], "must be an autoregressive"),
])
def test_cli_bad_levers(fixture_dir, tmp_path, capsys, argv, match):
    subst = {"mg": str(fixture_dir / "musicgen_state_dict.bin"), "magnet": str(fixture_dir)}
    out = tmp_path / "o.wav"
    rc = main(["generate", "x", "--model", str(fixture_dir), "--device", "cpu", "-o", str(out), "--quiet",
               *[a.format(**subst) for a in argv]])
    err = capsys.readouterr().err
    assert rc == 2
    assert match in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
