"""The procedural corpus: deterministic specs and audio, disjoint splits, captions that state the attributes."""
from __future__ import annotations

import re

import numpy as np
import pytest
from magnet_engine.train import corpus
from magnet_engine.train.corpus import (
    DRUMS,
    DYNAMICS,
    INSTRUMENTS,
    MODES,
    MOODS,
    PITCH_CLASSES,
    SAMPLE_RATE,
    TEMPO_RANGE,
    caption,
    caption_and_mentions,
    labels,
    normalize_key,
    render,
    sample_spec,
    split_seeds,
)


def test_specs_are_deterministic_and_valid() -> None:
    specs = [sample_spec(s) for s in range(300)]
    assert specs == [sample_spec(s) for s in range(300)]
    for sp in specs:
        assert TEMPO_RANGE[0] <= sp.tempo_bpm <= TEMPO_RANGE[1]
        assert sp.key in PITCH_CLASSES and sp.mode in MODES and sp.instrument in INSTRUMENTS
        assert sp.drums in DRUMS and sp.dynamics in DYNAMICS and sp.mood in MOODS
        assert sp.mood == corpus._mood(sp.mode, sp.tempo_bpm, sp.dynamics)
    # every value of every attribute occurs
    for attr, values in (("key", PITCH_CLASSES), ("mode", MODES), ("instrument", INSTRUMENTS), ("drums", DRUMS),
                         ("dynamics", DYNAMICS), ("mood", MOODS)):
        assert {getattr(sp, attr) for sp in specs} == set(values), attr
    assert len({sp.tempo_bpm for sp in specs}) > 80


def test_render_is_deterministic_and_normalised() -> None:
    spec = sample_spec(3)
    a = render(spec, 2.0)
    assert a.dtype == np.float32 and a.shape == (2 * SAMPLE_RATE,)
    np.testing.assert_array_equal(a, render(spec, 2.0))
    assert abs(float(np.abs(a).max()) - 0.9) < 1e-3
    assert np.isfinite(a).all() and float(np.sqrt(np.mean(a ** 2))) > 0.02
    assert not np.allclose(a, render(sample_spec(4), 2.0))
    b = render(spec, 1.5, sample_rate=32000)
    assert b.shape == (48000,) and abs(float(np.abs(b).max()) - 0.9) < 1e-3
    with pytest.raises(ValueError):
        render(spec, 0.0)


def test_a_shorter_clip_is_the_start_of_a_longer_one() -> None:
    for s in range(6):
        spec = sample_spec(s)
        a, b = render(spec, 2.0), render(spec, 3.0)[: 2 * SAMPLE_RATE]
        body = slice(0, len(a) - SAMPLE_RATE // 100)  # all but the 10 ms fade-out
        assert np.corrcoef(a[body], b[body])[0, 1] > 0.9999  # equal up to the peak normalisation


def test_every_instrument_and_drum_style_renders() -> None:
    seen: dict[tuple[str, str], np.ndarray] = {}
    for s in range(400):
        sp = sample_spec(s)
        if (sp.instrument, sp.drums) not in seen:
            seen[(sp.instrument, sp.drums)] = render(sp, 1.0)
    assert {i for i, _ in seen} == set(INSTRUMENTS) and {d for _, d in seen} == set(DRUMS)
    for a in seen.values():
        assert np.isfinite(a).all() and np.abs(a).max() > 0.5


def test_splits_are_disjoint_and_stable() -> None:
    train, valid, test = (set(split_seeds(s, 5000)) for s in ("train", "valid", "test"))
    assert len(train) == len(valid) == len(test) == 5000
    assert not (train & valid) and not (train & test) and not (valid & test)
    assert split_seeds("test", 3) == split_seeds("test", 10)[:3]
    with pytest.raises(ValueError):
        split_seeds("dev", 3)


def test_labels() -> None:
    sp = sample_spec(11)
    lab = labels(sp)
    assert lab == {"tempo_bpm": sp.tempo_bpm, "key": sp.key, "mode": sp.mode, "instrument": sp.instrument,
                   "drums": sp.drums, "dynamics": sp.dynamics, "mood": sp.mood}


def test_normalize_key() -> None:
    assert normalize_key("Bb") == "A#" and normalize_key("b flat") == "A#" and normalize_key("c#") == "C#"
    assert normalize_key("E") == "E" and normalize_key("Gb") == "F#"
    with pytest.raises(ValueError):
        normalize_key("H")


KEY_RE = re.compile(r"\b([A-G])(#|b| sharp| flat)? (major|minor|maj|min)\b")


def test_captions_state_the_attributes() -> None:
    n = 300
    texts, counts = [], {k: 0 for k in ("tempo_bpm", "tempo_word", "key", "drums", "mood", "dynamics")}
    for s in split_seeds("test", n):
        sp = sample_spec(s)
        text, said = caption_and_mentions(sp, s)
        assert text == caption(sp, s) == caption(sp, np.random.default_rng([s, 7]))  # deterministic by rng
        texts.append(text)
        low = text.lower()
        assert any(w in low for w in corpus._INSTRUMENT_WORDS[sp.instrument]), text
        assert (str(sp.tempo_bpm) in text) == said["tempo_bpm"], text
        if said["tempo_word"]:
            words = next(w for bound, w in corpus._TEMPO_WORDS if sp.tempo_bpm < bound)
            assert any(w in low for w in words), text
        m = KEY_RE.search(text)
        assert (m is not None) == said["key"], text
        if m:
            assert normalize_key(m.group(1) + (m.group(2) or "")) == sp.key, text
            assert m.group(3).startswith(sp.mode[:3]), text
        if said["drums"]:
            assert any(w.removeprefix("a ") in low for w in corpus._DRUM_WORDS[sp.drums]), text
        if said["mood"]:
            assert any(w in low for w in corpus._MOOD_WORDS[sp.mood]), text
        if said["dynamics"]:
            assert any(w in low for w in corpus._DYN_WORDS[sp.dynamics]), text
        for k in counts:
            counts[k] += said[k]
    assert len(set(texts)) == n  # varied phrasing
    for k, c in counts.items():  # each attribute is sometimes said, sometimes left out
        assert 0.2 * n < c < 0.95 * n, (k, c)
    # different rngs give different phrasings of one spec
    sp = sample_spec(0)
    assert len({caption(sp, r) for r in range(20)}) > 10
