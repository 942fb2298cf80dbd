"""Long-form generation (engine.longform): pieces past the model's segment as windowed continuations, streamed."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from magnet_engine.engine import longform
from magnet_engine.engine.cli import main
from magnet_engine.engine.config import SettingError
from magnet_engine.engine.scheduler import Scheduler

import magnet_engine as me

STEPS = (4, 2, 2, 2)  # the fixture's decoding steps: fast, and sampled with a seed below


def per_second_rms(audio: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """audio [B, 1, S] -> RMS of each whole second [B, seconds]."""
    s = audio.shape[-1] // sample_rate * sample_rate
    return audio[..., :s].reshape(audio.shape[0], -1, sample_rate).pow(2).mean(-1).sqrt()


def assert_audible(audio: torch.Tensor, sample_rate: int) -> None:
    """Every second within 6 dB of the piece's typical (median) second: no silent or collapsed window."""
    rms = per_second_rms(audio, sample_rate)
    floor = rms.median(dim=-1, keepdim=True).values / 2
    assert bool((rms > floor).all()), f"quiet seconds: {rms}"


@pytest.fixture(scope="module")
def default() -> me.Engine:
    return me.load(device="cpu")


def test_default_model_30s(default) -> None:
    out = default.generate("a calm piano melody", duration=30.0, seed=1)
    sr = default.sample_rate
    assert out.codes.shape == (1, 4, 30 * default.config.frame_rate) and out.audio.shape == (1, 1, 30 * sr)
    assert_audible(out.audio, sr)
    silence = default.decode(default.encode(torch.zeros(1, 1, sr)))  # the codec's own "nothing"
    assert bool((per_second_rms(out.audio, sr) > silence.pow(2).mean().sqrt()).all())
    plain = default.generate("a calm piano melody", seed=1, decode=False)
    assert torch.equal(out.codes[..., :plain.codes.shape[-1]], plain.codes), "window 0 is the plain run"


@pytest.fixture(scope="module")
def piece(tiny, settings):
    """3 s (three segments' worth) from the 1 s fixture model, two prompts, sampled with a seed."""
    kw = dict(duration=3.0, seed=11, steps=STEPS)
    return kw, tiny.generate(settings["prompts"], **kw)


def test_tiny_3s_length_first_window_and_seed(tiny, settings, piece) -> None:
    kw, out = piece
    assert out.codes.shape == (2, 4, 150) and out.audio.shape == (2, 1, 3 * tiny.sample_rate)
    assert_audible(out.audio, tiny.sample_rate)
    plain = tiny.generate(settings["prompts"], seed=11, steps=STEPS)
    t = plain.codes.shape[-1]
    assert torch.equal(out.codes[..., :t], plain.codes), "window 0 is token-equal to the plain run"
    again = tiny.generate(settings["prompts"], **kw)
    assert torch.equal(again.codes, out.codes) and torch.equal(again.audio, out.audio)
    other = tiny.generate(settings["prompts"], **{**kw, "seed": 12}, decode=False)
    assert not torch.equal(other.codes, out.codes)


def test_windows_continue_from_their_context(tiny, settings) -> None:
    """Each window's first C frames are the piece's last C: the context is the prompt of one continuation."""
    gen = tiny.request(["x"], duration=3.0, context=0.3, steps=STEPS).gen
    windows = longform.plan(tiny.config, gen)
    c = round(0.3 * tiny.config.frame_rate)
    assert [w.context for w in windows[1:]] == [c] * (len(windows) - 1)
    ends = [sum(w.keep for w in windows[:i + 1]) for i in range(len(windows))]  # the piece's length after each
    assert ends[-1] == 150
    assert [w.start for w in windows[1:]] == [e - c for e in ends[:-1]]


def test_greedy_window_2_continues_window_1(tiny, settings) -> None:
    """Independent of the window loop: greedy, 2 s with 0.3 s of context is 48 + 33 + 19 frames, and the second
    window is `generate` with the first window's last 15 frames as prompt_codes (15 + 33 = 48: a whole segment)."""
    kw = dict(greedy=True, steps=STEPS, decode=False)
    piece = tiny.generate(settings["prompts"], duration=2.0, context=0.3, **kw).codes
    first = tiny.generate(settings["prompts"], **kw).codes  # the plain run: one segment
    c = round(0.3 * tiny.config.frame_rate)
    assert first.shape[-1] == 48 and c == 15 and piece.shape[-1] == 100
    second = tiny.generate(settings["prompts"], prompt_codes=first[..., -c:], **kw).codes
    assert second.shape[-1] == 48 and torch.equal(second[..., :c], first[..., -c:])
    assert torch.equal(piece[..., :48], first) and torch.equal(piece[..., 48:81], second[..., c:])


def test_stream_concatenates_to_generate(tiny, settings, piece) -> None:
    kw, out = piece
    chunks = list(tiny.generate_stream(settings["prompts"], **kw))
    assert len(chunks) == chunks[0].windows == len(longform.plan(tiny.config, tiny.request(["x"], **kw).gen))
    assert all(c.audio.shape[-1] > 0 for c in chunks), "every window yields audio"
    assert torch.equal(torch.cat([c.audio for c in chunks], dim=-1), out.audio)
    assert torch.equal(torch.cat([c.codes for c in chunks], dim=-1), out.codes)
    one = list(tiny.generate_stream(settings["prompts"], seed=11, steps=STEPS))
    assert len(one) == 1 and one[0].windows == 1


@pytest.mark.parametrize("model", ["tiny", "default"])
@pytest.mark.parametrize("sizes", [(48, 23, 23, 56), (1,) * 40, (7, 2, 31)])
def test_stream_decoder_is_the_whole_decode(tiny, default, model, sizes) -> None:
    """Pushed in any pieces (smaller or larger than the codec's reach), the audio is the one-pass decode. Run in
    float64: the only difference left is summation order (~1e-16 relative), so the float64 default tolerance
    applies; a frame of missing context or lookahead would change samples at the signal's own scale (~0.1)."""
    eng = tiny if model == "tiny" else default
    codec = copy.deepcopy(eng.codec).double()
    codes = torch.randint(0, eng.config.card, (2, 4, sum(sizes)), generator=torch.Generator().manual_seed(0))
    stream = longform.StreamDecoder(codec)
    parts, at = [], 0
    for i, n in enumerate(sizes):
        parts.append(stream.push(codes[..., at:at + n], last=i == len(sizes) - 1))
        at += n
    torch.testing.assert_close(torch.cat(parts, dim=-1), codec.decode(codes))


def test_codecs_without_torch_decoder_decode_whole(tiny) -> None:
    """A codec with only `decode` (the onnxruntime backend's) gets the whole sequence at the last push."""
    class DecodeOnly:
        def decode(self, codes: torch.Tensor) -> torch.Tensor:
            return tiny.codec.decode(codes)

    codes = torch.randint(0, tiny.config.card, (1, 4, 30), generator=torch.Generator().manual_seed(2))
    stream = longform.StreamDecoder(DecodeOnly())
    first, last = stream.push(codes[..., :20], last=False), stream.push(codes[..., 20:], last=True)
    assert first.shape[-1] == 0 and torch.equal(last, tiny.codec.decode(codes))


@pytest.fixture(scope="module")
def mg(fixture_dir: Path) -> me.Engine:
    return me.load(fixture_dir / "musicgen_state_dict.bin", device="cpu")


@pytest.mark.parametrize("lever", ["rescorer", "hybrid"])
def test_levers_apply_to_long_pieces(tiny, mg, lever) -> None:
    """The rescorer rescores every window; the hybrid's AR prefix writes window 0, as in the plain run."""
    kw = dict(rescorer=mg) if lever == "rescorer" else dict(ar_model=mg, hybrid_prefix=0.3)
    out = tiny.generate(["x"], duration=2.0, seed=4, steps=STEPS, decode=False, **kw)
    plain = tiny.generate(["x"], seed=4, steps=STEPS, decode=False, **kw)
    assert out.codes.shape[-1] == 100 and torch.equal(out.codes[..., :plain.codes.shape[-1]], plain.codes)
    with pytest.raises(SettingError, match="hybrid_prefix"):  # the prefix must fit in the first window
        tiny.request(["x"], duration=2.0, ar_model=mg, hybrid_prefix=1.0)


def test_ar_baseline_long(mg) -> None:
    out = mg.generate(["slow sad piano"], duration=2.5, seed=5)
    assert out.codes.shape == (1, 4, 125) and out.audio.shape == (1, 1, int(2.5 * mg.sample_rate))
    plain = mg.generate(["slow sad piano"], seed=5, decode=False)
    assert torch.equal(out.codes[..., :plain.codes.shape[-1]], plain.codes)
    assert torch.equal(torch.cat([c.audio for c in mg.generate_stream(["slow sad piano"], duration=2.5, seed=5)],
                                 dim=-1), out.audio)


def test_prompt_codes_seed_the_first_window_only(tiny) -> None:
    prompt = torch.randint(0, tiny.config.card, (1, 4, 12), generator=torch.Generator().manual_seed(1))
    out = tiny.generate(["x"], duration=2.0, seed=2, steps=STEPS, prompt_codes=prompt, decode=False)
    plain = tiny.generate(["x"], seed=2, steps=STEPS, prompt_codes=prompt, decode=False)
    assert out.codes.shape[-1] == 100 and torch.equal(out.codes[..., :plain.codes.shape[-1]], plain.codes)
    with pytest.raises(SettingError, match="prompt_codes"):  # checked against the first window: one segment
        tiny.request(["x"], duration=2.0, prompt_codes=torch.zeros(1, 4, 60, dtype=torch.long))


def test_scheduler_submits_long_pieces_whole(tiny) -> None:
    """`Scheduler.submit` of a long piece: its windows run beside the batch and the future holds the joined piece,
    equal to Engine.generate's."""
    kw = dict(duration=2.0, steps=(2, 1, 1, 1), seed=5)
    with Scheduler(tiny) as sched:
        out = sched.submit("x", **kw).result(timeout=60)
    want = tiny.generate(["x"], **kw)
    assert torch.equal(out.codes, want.codes) and torch.equal(out.audio, want.audio)


def test_cli_long_shows_windows(tiny, fixture_dir: Path, tmp_path: Path, capsys) -> None:
    import soundfile as sf

    out = tmp_path / "long.wav"
    rc = main(["generate", "x", "--model", str(fixture_dir), "--device", "cpu", "--duration", "2",
               "--steps", "4,2,2,2", "--seed", "3", "-o", str(out)])
    err = capsys.readouterr().err
    n = len(longform.plan(tiny.config, tiny.request(["x"], duration=2.0).gen))
    assert rc == 0 and f"window {n}/{n} done: 2s of audio" in err and "window 1/" in err
    assert sf.info(str(out)).frames == 2 * 32000
    rc = main(["generate", "x", "--model", str(fixture_dir), "--device", "cpu", "--duration", "2",
               "--steps", "4,2,2,2", "--quiet", "-o", str(out)])
    assert rc == 0 and capsys.readouterr().err == ""
