"""Audio analysis (train/features.py) on rendered corpus clips, and `bench.quality` end to end on the tiny fixture."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from magnet_engine.train import features as F
from magnet_engine.train.corpus import INSTRUMENTS, SAMPLE_RATE, render, sample_spec, split_seeds


@pytest.fixture(scope="module")
def test_clips() -> list[tuple]:
    """The first 40 held-out clips (the split bench.quality uses), 8 s each."""
    return [(sample_spec(s), render(sample_spec(s), 8.0)) for s in split_seeds("test", 40)]


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one torch thread avoids spinning against the other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tempo_on_a_click_track() -> None:
    sr = SAMPLE_RATE
    audio = np.zeros(8 * sr, np.float32)
    click = np.hanning(64).astype(np.float32) * np.sin(np.arange(64) * 0.9).astype(np.float32)
    for t in np.arange(0, 7.9, 0.5):  # 120 bpm
        audio[int(t * sr):int(t * sr) + 64] += click
    assert abs(F.estimate_tempo(audio, sr) - 120) < 2.5
    assert F.estimate_tempo(np.zeros(sr * 3, np.float32), sr) == 0.0  # silence
    assert F.estimate_tempo(audio[: sr], sr) == 0.0  # too short to tell


def test_tempo_and_key_on_rendered_clips(test_clips: list[tuple]) -> None:
    # measured on these 40 clips: tempo strict 0.925, octave-tolerant 1.0, key+mode 0.85, mode 0.95 (on 100
    # clips of 10 s: 0.92, 1.0, 0.91, 0.95); the thresholds leave 2-5 clips of margin
    strict = octave = key = mode = 0
    for spec, audio in test_clips:
        s, o = F.tempo_correct(F.estimate_tempo(audio, SAMPLE_RATE), spec.tempo_bpm)
        k = F.estimate_key(audio, SAMPLE_RATE)
        strict, octave = strict + s, octave + o
        key, mode = key + (k == (spec.key, spec.mode)), mode + (k[1] == spec.mode)
    n = len(test_clips)
    assert octave / n >= 0.95 and strict / n >= 0.8
    assert key / n >= 0.75 and mode / n >= 0.85


def test_features_work_at_other_rates_and_shapes() -> None:
    spec = sample_spec(split_seeds("test", 1)[0])
    a32 = render(spec, 10.0, sample_rate=32000)
    s, o = F.tempo_correct(F.estimate_tempo(torch.from_numpy(a32)[None, None], 32000), spec.tempo_bpm)
    assert o
    assert F.estimate_key(a32[None], 32000) == F.estimate_key(render(spec, 10.0), SAMPLE_RATE)
    f16 = F.instrument_features(render(spec, 4.0), SAMPLE_RATE)
    f32 = F.instrument_features(render(spec, 4.0, 32000), 32000)
    assert f16.shape == f32.shape and np.abs(f16 - f32).max() < 0.5  # same features whatever the rate


def test_tempo_and_key_scoring() -> None:
    assert F.tempo_correct(100, 100) == (True, True) and F.tempo_correct(103.9, 100) == (True, True)
    assert F.tempo_correct(200, 100) == (False, True) and F.tempo_correct(33.4, 100) == (False, True)
    assert F.tempo_correct(150, 100) == (False, False)
    assert F.key_score(("C", "major"), ("C", "major")) == 1.0
    assert F.key_score(("G", "major"), ("C", "major")) == 0.5
    assert F.key_score(("A", "minor"), ("C", "major")) == 0.3
    assert F.key_score(("C", "minor"), ("C", "major")) == 0.2
    assert F.key_score(("D", "major"), ("C", "major")) == 0.0


def test_instrument_classifier_trains_saves_and_loads(tmp_path: Path, one_thread: None) -> None:
    # tiny (the default is 300 clips of 4 s plus their degraded copies, 1.0 on 100 held-out clips)
    clf = F.train_instrument_classifier(n_clips=80, seed=0, duration=1.5, augment=False)
    x, y = F.corpus_features(split_seeds("valid", 20), 2.0)
    acc = float((clf.logits(x).argmax(1).numpy() == y).mean())
    assert acc >= 0.7  # chance is 0.2; measured 0.90 here
    path = tmp_path / "clf.safetensors"
    clf.save(path)
    again = F.InstrumentClassifier.load(path)
    assert again.classes == INSTRUMENTS
    torch.testing.assert_close(again.logits(x), clf.logits(x))
    spec = sample_spec(split_seeds("valid", 1)[0])
    assert again.predict(render(spec, 3.0), SAMPLE_RATE) in INSTRUMENTS
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="is not an instrument classifier for these features"):
        F.InstrumentClassifier.load(bad)


def test_quality_bench_end_to_end(fixture_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                  one_thread: None) -> None:
    from magnet_engine.bench import quality

    js, md, clf = tmp_path / "q.json", tmp_path / "q.md", tmp_path / "clf.safetensors"
    conditions = list(quality.CONDITIONS)
    argv = ["--model", str(fixture_dir), "--ar-model", str(fixture_dir / "musicgen_state_dict.bin"), "--n", "2",
            "--batch", "2", "--duration", "0.5", "--device", "cpu", "--conditions", ",".join(conditions),
            "--classifier", str(clf),
            "--classifier-clips", "10", "--classifier-duration", "1", "--json", str(js), "--md", str(md), "--quiet"]
    assert quality.main(argv) == 0
    assert clf.is_file()  # trained once, then reused
    report = json.loads(js.read_text())
    assert report["settings"]["fast_steps"] == [4, 2, 2, 2] and report["settings"]["sample_rate"] == 32000
    assert [c["condition"] for c in report["conditions"]] == conditions
    for c in report["conditions"]:
        assert c["n"] == 2 and c["s_per_clip"] >= 0 and len(c["clips"]) == 2
        assert set(c["metrics"]) == set(quality.METRICS)
        for m in c["metrics"].values():
            assert m["all"] is None or 0.0 <= m["all"] <= 1.0
        for clip in c["clips"]:
            assert set(clip["estimate"]) == {"tempo", "key", "mode", "instrument"}
    table = md.read_text()
    assert table in capsys.readouterr().out and all(f"| {c} |" in table for c in conditions)
    # bad input is an error message and exit status 2, not a traceback
    assert quality.main(["--model", str(fixture_dir), "--conditions", "real,nope", "--quiet"]) == 2


def test_quality_bench_levers(fixture_dir: Path, tmp_path: Path, one_thread: None) -> None:
    """The lever conditions expand per prefix, run through the rescorer / hybrid paths, and need an AR model."""
    from magnet_engine.bench import quality

    js, clf = tmp_path / "q.json", tmp_path / "clf.safetensors"
    base = ["--model", str(fixture_dir), "--n", "2", "--batch", "2", "--duration", "0.5", "--device", "cpu",
            "--classifier", str(clf), "--classifier-clips", "10", "--classifier-duration", "1", "--quiet"]
    argv = base + ["--ar-model", str(fixture_dir / "musicgen_state_dict.bin"), "--conditions", "rescore,hybrid",
                   "--prefixes", "0.1,0.2", "--split", "valid", "--set", "temperature=1.5", "--set", "cfg=[3,1]",
                   "--json", str(js)]
    assert quality.main(argv) == 0
    report = json.loads(js.read_text())
    assert [c["condition"] for c in report["conditions"]] == ["rescore", "hybrid-0.1s", "hybrid-0.2s"]
    assert report["settings"]["prefixes"] == [0.1, 0.2] and 0 < report["settings"]["rescore_weight"] < 1
    assert report["settings"]["split"] == "valid"
    assert report["settings"]["overrides"] == {"temperature": 1.5, "cfg": [3, 1]}
    from magnet_engine.train.corpus import split_seeds

    assert [c["seed"] for c in report["conditions"][0]["clips"]] == split_seeds("valid", 2)
    assert all(c["n"] == 2 and len(c["clips"]) == 2 for c in report["conditions"])
    assert quality.main(base + ["--conditions", "rescore"]) == 2  # no --ar-model: refused with a message
    assert quality.main(base + ["--ar-model", "x", "--conditions", "hybrid", "--prefixes", "a"]) == 2
    assert quality.main(base + ["--conditions", "magnet", "--set", "nope=1"]) == 2  # unknown generation field
    assert quality.main(base + ["--conditions", "magnet", "--set", "top_p=2"]) == 2  # a value the config refuses


def test_quality_bench_continuation(fixture_dir: Path, tmp_path: Path, one_thread: None,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """"continue" expands to the resynthesised rest and MAGNeT's continuation per prefix, needs no AR model, scores
    only the audio after the prefix, and refuses a prefix that leaves nothing to generate."""
    from magnet_engine.bench import quality

    scored: list[int] = []
    analyse = quality.analyse
    monkeypatch.setattr(quality, "analyse", lambda audio, sr, clf: scored.append(audio.shape[-1]) or analyse(
        audio, sr, clf))
    js, clf = tmp_path / "q.json", tmp_path / "clf.safetensors"
    base = ["--model", str(fixture_dir), "--n", "2", "--batch", "2", "--duration", "0.5", "--device", "cpu",
            "--classifier", str(clf), "--classifier-clips", "10", "--classifier-duration", "1", "--quiet"]
    assert quality.main(base + ["--conditions", "continue", "--prefixes", "0.1,0.2", "--json", str(js)]) == 0
    report = json.loads(js.read_text())
    assert [c["condition"] for c in report["conditions"]] == ["resynth-after-0.1s", "continue-0.1s",
                                                               "resynth-after-0.2s", "continue-0.2s"]
    assert all(c["n"] == 2 for c in report["conditions"])
    # the fixture: 32 kHz, 640 samples a frame; 0.5 s = 25 frames, 24 generated (spans of 3); a prefix of 0.1 s = 5
    hop = 640
    assert scored == [(25 - 5) * hop] * 2 + [(24 - 5) * hop] * 2 + [(25 - 10) * hop] * 2 + [(24 - 10) * hop] * 2
    assert quality.main(base + ["--conditions", "continue", "--prefixes", "0.5"]) == 2


def test_quality_steps_parsing() -> None:
    from magnet_engine.bench.quality import parse_steps

    assert parse_steps(None, 4) == (4, 2, 2, 2) and parse_steps("8, 4,2,1", 4) == (8, 4, 2, 1)
    for bad in ("4,2", "4,2,2,0", "a,b,c,d"):
        with pytest.raises(ValueError):
            parse_steps(bad, 4)
