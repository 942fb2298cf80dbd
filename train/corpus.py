"""A procedural music corpus: seeded clip specs (tempo, key, mode, lead instrument, drums, dynamics, mood), a fast
vectorised numpy renderer, and varied text captions. It is what our default MAGNeT (codec + LM) is trained on, and
the held-out "test" split is what `bench.quality` asks the model for.

    spec = sample_spec(seed)                 # deterministic attributes
    audio = render(spec, duration=10.0)      # float32 [samples] mono at SAMPLE_RATE, peak 0.9
    text = caption(spec, rng)                # one of many phrasings; the rng picks the phrasing
    text, asked = caption_and_mentions(spec, rng)   # ... and which attributes the text states
    labels(spec)                             # the ground truth the evaluator scores against

Everything random is drawn from `np.random.default_rng([seed, stream, ...])`, one stream per purpose (spec, score,
each track's sound, drums), so each part is reproducible alone, the notes do not depend on the sample rate, and a
shorter clip is the start of a longer one (the score always spans 30 s and is cut, not recomposed).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import numpy as np

SAMPLE_RATE = 16000
PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
MODES = ("major", "minor")
INSTRUMENTS = ("piano", "pluck", "organ", "bass", "synth")
DRUMS = ("none", "rock", "house", "halftime")
DYNAMICS = ("soft", "loud")
MOODS = ("calm", "happy", "energetic", "sad", "dark", "melancholic", "intense")
TEMPO_RANGE = (60, 180)  # inclusive, bpm

# seed streams: one generator per purpose so changing one part of the recipe leaves the others alone
_SPEC, _SCORE, _SOUND = 0, 1, 2
# disjoint seed ranges per split; a split holds at most _SPLIT_SIZE seeds
_SPLIT_BASE = {"train": 0, "valid": 1_000_000_000, "test": 2_000_000_000}
_SPLIT_SIZE = 1_000_000_000
_SCORE_SPAN = 30.0  # seconds of music composed per seed: clips up to this long are prefixes of one another

_ENHARMONIC = {"DB": "C#", "EB": "D#", "GB": "F#", "AB": "G#", "BB": "A#", "CB": "B", "FB": "E", "E#": "F", "B#": "C"}
_SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
# chord progressions as 0-based scale degrees, one chord per bar, each starting on the tonic and avoiding the
# vi-IV-I-V family that sounds as much in the relative minor; degree 4 in minor is played as the harmonic-minor
# major V (raised 7th), the strongest audible cue that separates a minor key from its relative major
_PROGRESSIONS = {
    "major": ((0, 4, 5, 3), (0, 3, 4, 0), (0, 5, 3, 4), (0, 3, 0, 4), (0, 4, 3, 0), (0, 0, 3, 4)),
    "minor": ((0, 5, 6, 0), (0, 3, 4, 0), (0, 6, 5, 4), (0, 3, 5, 4), (0, 5, 3, 4), (0, 3, 0, 4)),
}
# melody rhythms for one 4/4 bar, in eighth notes (sum 8); no 16ths, so the beat level stays unambiguous
_RHYTHMS = ((2, 2, 2, 2), (1, 1, 2, 2, 2), (3, 1, 2, 2), (2, 1, 1, 4), (4, 4), (2, 2, 4), (1, 1, 1, 1, 2, 2),
            (4, 2, 2), (2, 2, 1, 1, 2), (3, 3, 2), (6, 2), (8,))
# drum patterns on a 16-step bar grid: (kick steps, snare steps, hat steps, open-hat steps)
_DRUM_PATTERNS = {
    "rock": ((0, 8), (4, 12), (0, 2, 4, 6, 8, 10, 12, 14), ()),
    "house": ((0, 4, 8, 12), (4, 12), (), (2, 6, 10, 14)),
    "halftime": ((0, 11), (8,), (0, 4, 8, 12), ()),  # kick/snare at half speed over hats on the beat
}


@dataclass(frozen=True)
class ClipSpec:
    """The attributes of one clip. `mood` follows from mode, tempo and dynamics (see `_mood`), so a caption's mood
    word is consistent with what one hears; `seed` also drives the notes and the sounds."""

    seed: int
    tempo_bpm: int  # TEMPO_RANGE
    key: str  # tonic, one of PITCH_CLASSES (sharps)
    mode: str  # MODES
    instrument: str  # INSTRUMENTS: the lead (melody + chords; for "bass", a bass riff)
    drums: str  # DRUMS
    dynamics: str  # DYNAMICS
    mood: str  # MOODS
    progression: int  # index into the mode's chord progressions


def normalize_key(name: str) -> str:
    """'Bb', 'b flat', 'A#' -> 'A#' (one of PITCH_CLASSES)."""
    s = name.strip().replace(" ", "").replace("♭", "b").replace("♯", "#")
    s = s[0].upper() + s[1:].lower().replace("flat", "b").replace("sharp", "#")
    s = _ENHARMONIC.get(s.upper(), s)
    if s not in PITCH_CLASSES:
        raise ValueError(f"unknown key {name!r}: use one of {', '.join(PITCH_CLASSES)} (or flats such as Bb)")
    return s


def _mood(mode: str, tempo: int, dynamics: str) -> str:
    slow, loud = tempo < 100, dynamics == "loud"
    if mode == "major":
        return ("happy" if loud else "calm") if slow else ("energetic" if loud else "happy")
    return ("dark" if loud else "sad") if slow else ("intense" if loud else "melancholic")


def _drum_choices(tempo: int) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Styles (and weights) that make sense at a tempo: house only near its home tempo, half-time only when fast."""
    names, weights = ["none", "rock"], [1.0, 1.5]
    if 110 <= tempo <= 135:
        names.append("house")
        weights.append(2.0)
    if tempo >= 110:
        names.append("halftime")
        weights.append(1.0)
    return tuple(names), tuple(w / sum(weights) for w in weights)


def sample_spec(seed: int) -> ClipSpec:
    """Draw a clip's attributes from `seed` (deterministic)."""
    rng = np.random.default_rng([int(seed), _SPEC])
    tempo = int(rng.integers(TEMPO_RANGE[0], TEMPO_RANGE[1] + 1))
    key = PITCH_CLASSES[int(rng.integers(12))]
    mode = MODES[int(rng.integers(2))]
    instrument = INSTRUMENTS[int(rng.integers(len(INSTRUMENTS)))]
    names, weights = _drum_choices(tempo)
    drums = names[int(rng.choice(len(names), p=weights))]
    dynamics = DYNAMICS[int(rng.integers(2))]
    progression = int(rng.integers(len(_PROGRESSIONS[mode])))
    return ClipSpec(seed=int(seed), tempo_bpm=tempo, key=key, mode=mode, instrument=instrument, drums=drums,
                    dynamics=dynamics, mood=_mood(mode, tempo, dynamics), progression=progression)


def split_seeds(split: str, n: int) -> list[int]:
    """The first `n` seeds of a split; "train", "valid" and "test" ranges are disjoint."""
    if split not in _SPLIT_BASE:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(_SPLIT_BASE)}")
    if not 0 <= n <= _SPLIT_SIZE:
        raise ValueError(f"n must be in [0, {_SPLIT_SIZE}], got {n}")
    base = _SPLIT_BASE[split]
    return list(range(base, base + n))


def labels(spec: ClipSpec) -> dict[str, object]:
    """Ground-truth attributes for the evaluator (everything but the seed and the progression index)."""
    d = asdict(spec)
    return {k: d[k] for k in ("tempo_bpm", "key", "mode", "instrument", "drums", "dynamics", "mood")}


# ------------------------------------------------------------------------------------------------------- score
# A score is a dict of tracks; each track is a float64 array [n_notes, 4] of (start s, duration s, midi, velocity).

def _chord_pcs(mode: str, degree: int) -> tuple[int, int, int]:
    """Semitones above the tonic of a triad on a scale degree (root, third, fifth), unwrapped to ascend."""
    scale = _SCALES[mode]
    notes = [scale[(degree + i) % 7] + 12 * ((degree + i) // 7) for i in (0, 2, 4)]
    if mode == "minor" and degree == 4:
        notes[1] += 1  # harmonic minor: the V chord is major
    return notes[0], notes[1], notes[2]


def _nearest(pitches: np.ndarray, target: float) -> int:
    return int(pitches[np.argmin(np.abs(pitches - target))])


def _compose(spec: ClipSpec, duration: float) -> dict[str, np.ndarray]:
    """The notes of a clip (independent of the sample rate). Strong beats carry the chord changes, bass notes and
    accented melody notes; off-beats only eighth notes at lower velocity, so the metre is audible without drums."""
    rng = np.random.default_rng([spec.seed, _SCORE])
    beat = 60.0 / spec.tempo_bpm
    bar = 4 * beat
    n_bars = int(math.ceil(max(duration, _SCORE_SPAN) / bar)) + 1  # fixed span: a shorter clip is a prefix
    tonic = PITCH_CLASSES.index(spec.key)
    scale = np.array(_SCALES[spec.mode])
    prog = _PROGRESSIONS[spec.mode][spec.progression]
    vel0 = 1.0 if spec.dynamics == "loud" else 0.6
    # melody register: the tonic in octave 4 or 5 (MIDI 60-83); all scale pitches in range, plus the raised 7th for
    # minor V chords
    lo = 60 + tonic if spec.instrument != "synth" else 67 + (tonic + 5) % 12
    pitches = np.array([lo - 12 + 12 * o + s for o in range(4) for s in scale])
    pitches = pitches[(pitches >= lo - 5) & (pitches <= lo + 19)]
    tracks: dict[str, list[tuple[float, float, float, float]]] = {"lead": [], "chords": [], "bass": [], "pad": []}
    motif = [_RHYTHMS[int(rng.integers(len(_RHYTHMS)))] for _ in range(2)]  # a 2-bar rhythm, repeated
    prev = lo + (12 if spec.instrument == "organ" and rng.random() < 0.5 else 0)
    comp = int(rng.integers(2))  # per-clip comping variant
    for b in range(n_bars):
        t0 = b * bar
        degree = prog[b % len(prog)]
        chord = np.array(_chord_pcs(spec.mode, degree)) + tonic
        chord_pcs = chord % 12
        # -- melody (not for bass-led clips: the riff is the lead)
        if spec.instrument != "bass":
            rhythm = motif[b % 2] if rng.random() < 0.8 else _RHYTHMS[int(rng.integers(len(_RHYTHMS)))]
            if spec.instrument == "organ":  # pads move slowly: merge pairs of notes
                rhythm = tuple(rhythm[i] + (rhythm[i + 1] if i + 1 < len(rhythm) else 0)
                               for i in range(0, len(rhythm), 2))
            pos = 0
            for dur8 in rhythm:
                strong = pos % 2 == 0
                if pos == 0 and degree == 0 and rng.random() < 0.7:
                    note = _nearest(pitches[pitches % 12 == tonic], prev)  # tonic on the tonic chord's downbeat
                elif strong:
                    cands = pitches[np.isin(pitches % 12, chord_pcs)]
                    note = _nearest(cands, prev + rng.normal(0, 3))
                else:
                    i = int(np.argmin(np.abs(pitches - prev)))
                    i = int(np.clip(i + rng.choice((-2, -1, 1, 2)), 0, len(pitches) - 1))
                    note = int(pitches[i])
                    if spec.mode == "minor" and degree == 4 and note % 12 == (tonic + 10) % 12:
                        note += 1  # leading tone over V
                accent = 1.0 if pos % 4 == 0 else (0.85 if strong else 0.7)
                tracks["lead"].append((t0 + pos * beat / 2, dur8 * beat / 2, note, vel0 * accent))
                prev, pos = note, pos + dur8
        # -- chords
        voicing = chord + 12 * ((55 - chord) // 12 + 1)  # root position in MIDI 55..66 and above
        if spec.instrument == "bass":
            for p in voicing:
                tracks["pad"].append((t0, bar, p, 0.5 * vel0))
        elif spec.instrument == "pluck":  # arpeggio in eighths, accented on beats
            order = (0, 1, 2, 1) if comp else (0, 1, 2, 3)
            arp = np.concatenate([voicing, voicing[:1] + 12])
            for e in range(8):
                tracks["chords"].append((t0 + e * beat / 2, beat / 2, arp[order[e % 4]],
                                         vel0 * (0.8 if e % 2 == 0 else 0.5)))
        elif spec.instrument == "organ":
            for p in voicing:
                tracks["chords"].append((t0, bar, p, 0.7 * vel0))
        else:  # piano / synth: block chords on every beat or on beats 1 and 3
            hits = (0, 1, 2, 3) if comp else (0, 2)
            for h in hits:
                for p in voicing:
                    tracks["chords"].append((t0 + h * beat, beat * (4 / len(hits)) * 0.9, p,
                                             vel0 * (0.8 if h == 0 else 0.65)))
        # -- bass: root in octave 2 (MIDI 36-47)
        root = 36 + chord[0] % 12
        if spec.instrument == "bass":  # the riff: eighths over root / fifth / octave, accented on beats
            third = root + (chord[1] - chord[0])  # the chord's third keeps the mode audible in the riff
            fifth = root + 7
            riff = (root, root, root + 12, root, fifth, third, root + 12, fifth) if comp else \
                (root, root + 12, third, fifth, root, root + 12, fifth, third)
            for e in range(8):
                if e % 2 == 1 and rng.random() < 0.3:
                    continue  # rests on some off-beats
                tracks["bass"].append((t0 + e * beat / 2, beat / 2 * 0.9, riff[e],
                                       vel0 * (1.0 if e % 2 == 0 else 0.7)))
        else:
            for h in (0, 1, 2, 3):  # on every beat: the pulse stays audible without drums
                tracks["bass"].append((t0 + h * beat, beat * 0.9, root, vel0 * (0.9 if h == 0 else 0.7)))
    out = {}
    for name, notes in tracks.items():
        a = np.array(notes, dtype=np.float64).reshape(-1, 4)
        a[:, 0] = np.maximum(a[:, 0] + rng.uniform(-0.004, 0.004, len(a)), 0.0)  # ±4 ms: not machine-exact
        out[name] = a[a[:, 0] < duration]
    return out


# ------------------------------------------------------------------------------------------------------- sound

def _hz(midi: np.ndarray) -> np.ndarray:
    return 440.0 * 2.0 ** ((midi - 69.0) / 12.0)


def _note_grid(notes: np.ndarray, sr: int, release: float) -> tuple[np.ndarray, ...]:
    """Per-note columns and a shared time axis for batched synthesis: t [1, L] seconds since onset, and
    f, dur, vel [n, 1]; L covers the longest note plus its release."""
    dur = notes[:, 1:2]
    n_len = int(math.ceil((dur.max() + release) * sr))
    t = (np.arange(n_len, dtype=np.float32) / sr)[None, :]
    return t, _hz(notes[:, 2:3]).astype(np.float32), dur.astype(np.float32), notes[:, 3:4].astype(np.float32)


def _env(t: np.ndarray, dur: np.ndarray, attack: float, decay: float, sustain: float, release: float) -> np.ndarray:
    """Linear attack, exponential decay towards `sustain`, exponential release after note-off: [n, L]."""
    a = np.minimum(t / attack, 1.0)
    body = sustain + (1.0 - sustain) * np.exp(-t / decay)
    held = t <= dur
    rel = np.exp(-np.maximum(t - dur, 0.0) / release)
    body_at_off = sustain + (1.0 - sustain) * np.exp(-dur / decay)
    return a * np.where(held, body, body_at_off * rel)


def _saw(phase: np.ndarray, dt: np.ndarray) -> np.ndarray:
    """PolyBLEP band-limited sawtooth in [-1, 1]: phase [n, L] in cycles, dt = f / sr [n, 1]. The correction only
    touches the few samples within one step of a wrap, so it is applied sparsely."""
    p = phase - np.floor(phase)
    out = 2.0 * p - 1.0
    dtb = np.broadcast_to(dt, p.shape)
    m = p < dtb
    x = p[m] / dtb[m]
    out[m] -= x + x - x * x - 1.0
    m = p > 1.0 - dtb
    x = (p[m] - 1.0) / dtb[m]
    out[m] -= x * x + x + x + 1.0
    return out


def _synth(kind: str, notes: np.ndarray, sr: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """-> (waves [n, L] float32, lengths [n] samples) for one track's notes, each wave starting at its onset."""
    tau = np.float32(2 * np.pi)
    nyq = 0.45 * sr
    if kind == "piano":  # FM e-piano: 1:1 modulator whose index decays, plus a short bell partial at 7x
        release = 0.25
        t, f, dur, vel = _note_grid(notes, sr, release)
        index = (0.8 + 2.2 * vel) * np.exp(-t / 0.4)  # exp over [1, L] only: shared by all notes
        w = np.sin(tau * f * t + index * np.sin(tau * f * t))
        bell = np.where(7 * f < nyq, 0.3 * vel, 0.0).astype(np.float32) * np.exp(-t / 0.06) * np.sin(tau * 7 * f * t)
        decay = 1.2 * (261.6 / f) ** 0.4  # higher notes die faster
        w = (w + bell) * _env(t, dur, 0.002, decay, 0.0, release)
    elif kind == "pluck":  # Karplus-Strong-like: harmonics decaying at rates growing with their frequency
        release = 0.12
        t, f, dur, vel = _note_grid(notes, sr, release)
        w = np.zeros((len(notes), t.shape[1]), np.float32)
        spectrum = rng.uniform(0.5, 1.0, (len(notes), 12)).astype(np.float32)
        for k in range(1, 13):
            fk = k * f
            amp = np.where(fk < nyq, spectrum[:, k - 1:k] / k * vel ** (0.15 * k), 0.0).astype(np.float32)
            rate = (1.5 + 7.0 * (fk / 1000.0) ** 1.5).astype(np.float32)
            m = min(t.shape[1], int(8.0 / float(rate.min()) * sr) + 1)  # until e^-8: upper harmonics die fast
            w[:, :m] += amp * np.exp(-t[:, :m] * rate) * np.sin(tau * fk * t[:, :m])
        w *= _env(t, dur + 0.15, 0.001, 1e9, 1.0, release)  # damped shortly after the next note
    elif kind in ("organ", "pad"):  # drawbar organ / pad: additive sines, slow attack, gentle vibrato
        release = 0.3
        t, f, dur, vel = _note_grid(notes, sr, release)
        # vibrato: instantaneous frequency f·(1 + 0.003·sin(2π·5.5·t)), integrated into the phase
        phase = tau * f * (t + np.float32(0.003 / (2 * np.pi * 5.5)) * (1.0 - np.cos(tau * 5.5 * t)))
        drawbars = ((1, 1.0), (2, 0.6), (3, 0.45), (4, 0.3), (6, 0.2), (8, 0.12)) if kind == "organ" else \
            ((1, 1.0), (2, 0.25))
        w = np.zeros((len(notes), t.shape[1]), np.float32)
        for k, a in drawbars:
            w += np.where(k * f < nyq, np.float32(a), 0.0) * np.sin(k * phase)
        w *= _env(t, dur, 0.12 if kind == "organ" else 0.3, 1e9, 1.0, release) * (0.8 + 0.2 * vel)
    elif kind == "bass":  # saw bass (lowpassed per track by the caller), punchy envelope
        release = 0.05
        t, f, dur, vel = _note_grid(notes, sr, release)
        w = _saw(f * t, f / sr) * _env(t, dur, 0.004, 0.25, 0.55, release)
    elif kind == "sub":  # supporting sine bass under the other leads
        release = 0.08
        t, f, dur, vel = _note_grid(notes, sr, release)
        w = (np.sin(tau * f * t) + 0.3 * np.sin(2 * tau * f * t)) * _env(t, dur, 0.005, 0.5, 0.3, release)
    elif kind == "synth":  # two detuned saws
        release = 0.12
        t, f, dur, vel = _note_grid(notes, sr, release)
        det = np.float32(2 ** (9 / 1200))
        w = 0.5 * (_saw(f * det * t, f * det / sr) + _saw(f / det * t + 0.37, f / det / sr))
        w *= _env(t, dur, 0.01, 0.3, 0.7, release)
    else:
        raise ValueError(f"unknown synth {kind!r}")
    lengths = np.minimum(((notes[:, 1] + release) * sr).astype(np.int64), w.shape[1])
    return (w * vel).astype(np.float32), lengths


def _place(out: np.ndarray, starts: np.ndarray, waves: np.ndarray, lengths: np.ndarray, gain: float = 1.0) -> None:
    """Overlap-add waves [n, L] at sample offsets `starts` [n] (clipped at the buffer's end)."""
    n = len(out)
    for s, w, ln in zip(starts, waves, lengths):
        e = min(n, s + ln)
        if e > s:
            out[s:e] += gain * w[: e - s]


def _fft_filter(x: np.ndarray, sr: int, lo: float | None = None, hi: float | None = None,
                order: float = 2.0) -> np.ndarray:
    """Zero-phase Butterworth-shaped band filter in the frequency domain (whole buffer at once)."""
    spec = np.fft.rfft(x)
    fr = np.fft.rfftfreq(len(x), 1.0 / sr)
    gain = np.ones_like(fr)
    if hi is not None:
        gain /= np.sqrt(1.0 + (fr / hi) ** (2 * order))
    if lo is not None:
        gain /= np.sqrt(1.0 + (lo / np.maximum(fr, 1e-3)) ** (2 * order))
    return np.fft.irfft(spec * gain, len(x)).astype(np.float32)


def _drum_sounds(sr: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One kick / snare / closed hat / open hat sample per clip (slight random variation between clips)."""
    def tt(sec: float) -> np.ndarray:
        return np.arange(int(sec * sr), dtype=np.float32) / sr

    t = tt(0.35)
    f0 = rng.uniform(45, 60)
    phase = 2 * np.pi * (f0 * t + rng.uniform(80, 140) * 0.035 * (1 - np.exp(-t / 0.035)))  # pitch drop
    kick = np.sin(phase) * np.exp(-t / rng.uniform(0.12, 0.22))
    kick[: int(0.002 * sr)] += 0.4 * rng.standard_normal(int(0.002 * sr))  # beater click
    t = tt(0.25)
    noise = rng.standard_normal(len(t)).astype(np.float32)
    snare = 0.7 * _fft_filter(noise, sr, lo=1000, hi=6000, order=1) * np.exp(-t / rng.uniform(0.05, 0.09))
    snare += 0.5 * np.sin(2 * np.pi * rng.uniform(170, 210) * t) * np.exp(-t / 0.05)
    t = tt(0.2)
    hiss = _fft_filter(rng.standard_normal(len(t)).astype(np.float32), sr, lo=6000 if sr > 14000 else 0.4 * sr,
                       order=3)
    hat = hiss * np.exp(-t / 0.018)
    open_hat = hiss * np.exp(-t / 0.09)
    sounds = {"kick": kick, "snare": snare, "hat": hat, "open": open_hat}
    return {k: (v / np.abs(v).max()).astype(np.float32) for k, v in sounds.items()}


def _drums(spec: ClipSpec, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros(n, np.float32)
    if spec.drums == "none":
        return out
    loud = spec.dynamics == "loud"
    sounds = _drum_sounds(sr, rng)
    step = 60.0 / spec.tempo_bpm / 4  # 16th note
    n_bars = int(max(n / sr, _SCORE_SPAN) / (16 * step)) + 1  # as in _compose: the pattern is duration-free
    kicks, snares, hats, opens = _DRUM_PATTERNS[spec.drums]
    levels = {"kick": 1.0, "snare": 0.8, "hat": 0.35, "open": 0.35}
    for name, steps in (("kick", kicks), ("snare", snares), ("hat", hats), ("open", opens)):
        if not steps:
            continue
        pos = (np.arange(n_bars)[:, None] * 16 + np.array(steps)[None, :]).ravel()
        jitter, spread = rng.uniform(-0.003, 0.003, len(pos)), rng.uniform(0.85, 1.0, len(pos))  # before the cut
        starts = np.maximum(np.round((pos * step + jitter) * sr).astype(np.int64), 0)
        vel = np.where(pos % 4 == 0, 1.0, 0.7) * spread * levels[name] * (1.0 if loud else 0.6)
        keep = starts < n
        starts, vel = starts[keep], vel[keep]
        w = sounds[name]
        for s, v in zip(starts, vel):
            e = min(n, s + len(w))
            out[s:e] += v * w[: e - s]
    return out


# music level per lead instrument at "loud" velocities (median peak of the summed tracks, measured): dividing by a
# constant instead of each clip's own peak keeps the music/drums balance, and so the audio, duration-independent
_MUSIC_PEAK = {"piano": 2.8, "pluck": 1.95, "organ": 3.9, "bass": 1.65, "synth": 2.0}


def render(spec: ClipSpec, duration: float = 10.0, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The clip's audio: float32 [round(duration·sample_rate)] mono, peak-normalised to 0.9. Deterministic in spec;
    the notes do not depend on the sample rate (the drum noise does), and a shorter clip is, up to its gain and
    the 10 ms fade-out, the start of a longer one (for durations up to 30 s)."""
    if duration <= 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    sr = int(sample_rate)
    n = int(round(duration * sr))
    score = _compose(spec, duration)
    loud = spec.dynamics == "loud"
    tracks = {}
    lead_kind = spec.instrument
    for i, (name, kind, gain) in enumerate((("lead", lead_kind, 1.0), ("chords", lead_kind, 0.45),
                                            ("pad", "pad", 0.5), ("bass", "bass" if lead_kind == "bass" else "sub",
                                                                  1.0 if lead_kind == "bass" else 0.55))):
        notes = score[name]
        buf = np.zeros(n, np.float32)
        if len(notes):  # one generator per track, so each track's random draws do not depend on the others
            waves, lengths = _synth(kind, notes, sr, np.random.default_rng([spec.seed, _SOUND, i]))
            starts = np.round(notes[:, 0] * sr).astype(np.int64)
            _place(buf, starts, waves, lengths, gain)
        tracks[name] = buf
    if spec.instrument == "bass":  # lowpass the saw: brighter when loud
        tracks["bass"] = _fft_filter(tracks["bass"], sr, hi=1400.0 if loud else 700.0, order=2)
    if spec.instrument == "synth":
        tracks["lead"] = _fft_filter(tracks["lead"], sr, hi=5000.0 if loud else 2500.0, order=1)
        tracks["chords"] = _fft_filter(tracks["chords"], sr, hi=3000.0 if loud else 1500.0, order=1)
    music = (tracks["lead"] + tracks["chords"] + tracks["pad"] + tracks["bass"]) / _MUSIC_PEAK[spec.instrument]
    drums = _drums(spec, n, sr, np.random.default_rng([spec.seed, _SOUND, sr, 9]))
    mix = music + (0.9 if loud else 0.75) * drums
    if loud:  # saturation: a loud clip has a lower crest factor (more RMS at the same peak) and more harmonics
        mix = np.tanh(1.7 * mix)
    fade = min(n, int(0.01 * sr))
    mix[n - fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    return (0.9 * mix / max(float(np.abs(mix).max()), 1e-6)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------- caption

_INSTRUMENT_WORDS = {
    "piano": ("piano", "electric piano", "e-piano", "rhodes", "keys", "electric keys"),
    "pluck": ("plucked guitar", "acoustic guitar", "plucked strings", "harp", "pluck synth", "nylon guitar"),
    "organ": ("organ", "organ pad", "warm pad", "synth pad", "ambient pad", "church organ"),
    "bass": ("bass", "bass guitar", "deep bass", "bassline", "synth bass", "groovy bass"),
    "synth": ("synth lead", "lead synth", "synthesizer", "saw synth", "analog synth", "retro synth"),
}
_DRUM_WORDS = {
    "none": ("no drums", "without drums", "without percussion", "no beat"),
    "rock": ("rock drums", "a rock beat", "a steady drum beat", "live drums", "a backbeat"),
    "house": ("a house beat", "four on the floor drums", "a dance beat", "house drums", "a club beat"),
    "halftime": ("halftime drums", "a half-time groove", "a slow heavy beat", "a trap-style halftime beat"),
}
_MOOD_WORDS = {
    "calm": ("calm", "peaceful", "relaxing", "gentle", "serene"),
    "happy": ("happy", "cheerful", "joyful", "bright", "uplifting"),
    "energetic": ("energetic", "upbeat", "driving", "powerful", "lively"),
    "sad": ("sad", "sorrowful", "mournful", "gloomy", "somber"),
    "dark": ("dark", "brooding", "ominous", "heavy", "menacing"),
    "melancholic": ("melancholic", "wistful", "bittersweet", "nostalgic", "pensive"),
    "intense": ("intense", "aggressive", "urgent", "fierce", "tense"),
}
_DYN_WORDS = {"soft": ("soft", "quiet", "gentle", "mellow"), "loud": ("loud", "punchy", "powerful", "hard-hitting")}
_TEMPO_WORDS = (  # (upper bpm bound, words)
    (90, ("slow", "laid-back", "slow-paced")),
    (125, ("mid-tempo", "moderate", "medium tempo")),
    (999, ("fast", "uptempo", "fast-paced", "quick")),
)
_FLAT_SPELLING = {"C#": "Db", "D#": "Eb", "F#": "Gb", "G#": "Ab", "A#": "Bb"}
_NOUNS = ("track", "tune", "piece", "song", "instrumental", "loop", "melody")


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _a(phrase: str) -> str:
    """'a piano' / 'an organ' / 'an e-piano'."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _spell_tonic(name: str, rng: np.random.Generator) -> str:
    """'A#' -> 'A#', 'Bb', 'A sharp' or 'B flat' as the captions write it; naturals stay as they are."""
    if name in _FLAT_SPELLING and rng.random() < 0.5:
        name = _FLAT_SPELLING[name]
    if len(name) == 2 and rng.random() < 0.3:
        name = name[0] + (" sharp" if name[1] == "#" else " flat")
    return name


def _key_text(spec: ClipSpec, rng: np.random.Generator) -> str:
    name = _spell_tonic(spec.key, rng)
    mode = spec.mode if rng.random() < 0.85 else ("maj" if spec.mode == "major" else "min")
    return f"{name} {mode}"


def _tempo_text(spec: ClipSpec, rng: np.random.Generator) -> tuple[str, str]:
    """-> (a tempo phrase usable after 'at'/'in' or alone, a tempo adjective)."""
    adjective = next(w for bound, w in _TEMPO_WORDS if spec.tempo_bpm < bound)
    bpm = _pick(rng, (f"{spec.tempo_bpm} bpm", f"{spec.tempo_bpm} BPM", f"{spec.tempo_bpm} beats per minute"))
    return bpm, _pick(rng, adjective)


def caption(spec: ClipSpec, rng: np.random.Generator | int) -> str:
    """A text description of the clip, phrased by `rng` (a Generator, or an int seed). The instrument is always
    named; tempo (as a number or a word), key/mode, drums, mood and dynamics are each sometimes left out."""
    return caption_and_mentions(spec, rng)[0]


def caption_and_mentions(spec: ClipSpec, rng: np.random.Generator | int) -> tuple[str, dict[str, bool]]:
    """`caption` plus which attributes the text states: {"instrument", "tempo_bpm" (the number), "tempo_word"
    (slow / mid-tempo / fast), "key" (tonic and mode together), "drums", "mood", "dynamics"} -> bool. The
    evaluator scores adherence to an attribute only on captions that ask for it."""
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng([int(rng), 7])
    inst = _pick(rng, _INSTRUMENT_WORDS[spec.instrument])
    mood = _pick(rng, _MOOD_WORDS[spec.mood])
    bpm, tempo_adj = _tempo_text(spec, rng)
    key = _key_text(spec, rng)
    drums = _pick(rng, _DRUM_WORDS[spec.drums])
    dyn = _pick(rng, _DYN_WORDS[spec.dynamics])
    noun = _pick(rng, _NOUNS)
    use = {a: rng.random() < p for a, p in (("mood", 0.75), ("bpm", 0.5), ("tempo_adj", 0.5), ("key", 0.7),
                                             ("drums", 0.75), ("dyn", 0.35))}
    # every attribute keeps at least a 1/4 chance of being named; tempo as a number or a word, rarely both
    if use["bpm"] and use["tempo_adj"] and rng.random() < 0.7:
        use["tempo_adj"] = False
    template = int(rng.integers(5))
    adjs = [w for w, on in ((tempo_adj, use["tempo_adj"]), (mood, use["mood"]), (dyn, use["dyn"])) if on]
    if template == 0:  # "a slow sad piano piece in A minor at 70 bpm with no drums"
        parts = [_a(" ".join([*adjs, inst, noun]))]
        if use["key"]:
            parts.append(f"in {key}")
        if use["bpm"]:
            parts.append(f"at {bpm}")
        if use["drums"]:
            parts.append(f"with {drums}" if spec.drums != "none" else f", {drums}")
        text = " ".join(parts).replace(" ,", ",")
    elif template == 1:  # "upbeat 128 bpm house beat with a deep bass"
        lead = " ".join([*adjs, *([bpm] if use["bpm"] else [])])
        if spec.drums != "none" and use["drums"]:
            body = f"{drums.removeprefix('a ')} with {_a(inst)}"
        else:
            body = f"{inst} {noun}" + (f", {drums}" if use["drums"] else "")
        text = f"{lead} {body}".strip() + (f", {key}" if use["key"] else "")
    elif template == 2:  # "calm organ pad in D major at 70 bpm"
        text = " ".join([*adjs, inst])
        if use["key"]:
            text += f" in {key}"
        if use["bpm"]:
            text += f" at {bpm}"
        if use["drums"]:
            text += f", {drums}"
    elif template == 3:  # tag list: "piano, sad, A minor, 70 bpm, no drums"
        tags = [inst, *adjs]
        if use["key"]:
            tags.append(key)
        if use["bpm"]:
            tags.append(bpm)
        if use["drums"]:
            tags.append(drums)
        order = rng.permutation(len(tags) - 1) + 1  # instrument first, the rest shuffled
        text = ", ".join([tags[0], *(tags[i] for i in order)])
    else:  # a sentence: "Here is a sad song played on an electric piano, in the key of A minor."
        opener = _pick(rng, ("", "This is ", "Here is ", "Imagine "))
        text = f"{opener}{_a(' '.join([*adjs, noun]))} played on {_a(inst)}"
        text = text[0].upper() + text[1:]
        if use["key"]:
            text += f", in the key of {key}"
        if use["bpm"]:
            text += f", {bpm}"
        if use["drums"]:
            text += f", {drums}"
        text += "."
    mentions = {"instrument": True, "tempo_bpm": use["bpm"], "tempo_word": use["tempo_adj"], "key": use["key"],
                "drums": use["drums"], "mood": use["mood"], "dynamics": use["dyn"]}
    return text, mentions


# ------------------------------------------------------------------------------------------ caption edits (probes)

_KEY_PHRASE = re.compile(r"\b([A-G])( sharp| flat|#|b)? (major|minor|maj|min)\b")  # as `_key_text` writes it
_BPM_PHRASE = re.compile(r"\b(\d{2,3})( bpm| BPM| beats per minute)\b")  # as `_tempo_text` writes it
_FLIP_MODE = {"major": "minor", "minor": "major", "maj": "min", "min": "maj"}
SWAPS = ("key", "mode", "bpm")
FOIL_BPM_GAP = 0.08  # a random bpm foil differs by more than this ratio (twice the evaluator's tolerance)


def swap_attribute(text: str, attribute: str, rng: np.random.Generator | None = None) -> str | None:
    """The caption with one stated attribute changed and every other word kept, or None when the caption does not
    state it. Without `rng` (the probes, `train.lm.caption_swap`): "key" moves the tonic a tritone (same mode),
    "mode" flips major <-> minor, "bpm" moves the number by 60 within TEMPO_RANGE. With `rng` (the foils of the
    contrastive training term, `train.lm.contrast_loss`): "key" moves the tonic by 1..11 semitones, "bpm" draws
    another tempo in TEMPO_RANGE more than `FOIL_BPM_GAP` away in ratio, "mode" flips as before."""
    if attribute not in SWAPS:
        raise ValueError(f"unknown attribute {attribute!r}: choose one of {', '.join(SWAPS)}")
    m = (_BPM_PHRASE if attribute == "bpm" else _KEY_PHRASE).search(text)
    if m is None:
        return None
    if attribute == "bpm":
        n = int(m.group(1))
        if rng is None:
            new = n + 60 if n + 60 <= TEMPO_RANGE[1] else n - 60
        else:  # far enough that the evaluator's ±4% never accepts the foil's tempo for the caption's
            far = [b for b in range(TEMPO_RANGE[0], TEMPO_RANGE[1] + 1) if abs(b / n - 1) > FOIL_BPM_GAP]
            new = far[int(rng.integers(len(far)))]
        return text[:m.start(1)] + str(new) + text[m.end(1):]
    if attribute == "mode":
        return text[:m.start(3)] + _FLIP_MODE[m.group(3)] + text[m.end(3):]
    accidental = {" sharp": "#", " flat": "b", "#": "#", "b": "b"}.get(m.group(2) or "", "")
    tonic = PITCH_CLASSES.index(normalize_key(m.group(1) + accidental))
    if rng is None:
        return text[:m.start()] + f"{PITCH_CLASSES[(tonic + 6) % 12]} {m.group(3)}" + text[m.end():]
    # a foil is spelled as the captions spell keys (`_key_text`), so the spelling never tells it from a real caption
    name = PITCH_CLASSES[(tonic + int(rng.integers(1, 12))) % 12]
    style = m.group(2)  # the caption's own spelling of an accidental: '#', 'b', ' sharp' or ' flat'
    if len(name) == 1 or not style:
        name = _spell_tonic(name, rng)
    else:
        name = _FLAT_SPELLING[name] if style in ("b", " flat") else name
        name = name[0] + (" sharp" if name[1] == "#" else " flat") if style.startswith(" ") else name
    return text[:m.start()] + f"{name} {m.group(3)}" + text[m.end():]


def stated_swaps(text: str) -> tuple[str, ...]:
    """The attributes of SWAPS that a caption states (those `swap_attribute` can change)."""
    return tuple(a for a in SWAPS if (_BPM_PHRASE if a == "bpm" else _KEY_PHRASE).search(text))
