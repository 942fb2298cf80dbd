"""Audio-only analysis shared by the quality evaluator (`bench.quality`) and the tests: tempo, key/mode and the lead
instrument family, each estimated from a waveform alone (no labels, no codes).

    estimate_tempo(audio, sr) -> bpm            onset-strength envelope; autocorrelation × Fourier tempogram × prior
    estimate_key(audio, sr) -> (key, mode)      STFT chroma correlated with the 24 Krumhansl-Kessler key profiles
    clf = train_instrument_classifier(300, 0)   logistic regression on log-mel statistics of corpus clips
    clf.predict(audio, sr) -> "piano" | ...     clf.save(path) / InstrumentClassifier.load(path) (safetensors)

All analysis works at any sample rate: frame sizes are fixed in seconds and the mel filterbank stops at 8 kHz (the
corpus's Nyquist), so a 32 kHz codec output is measured on the same features as a 16 kHz corpus clip.

Scoring conventions (`tempo_correct`, `key_score`): tempo is "strict" when within ±4% of the truth and
"octave-tolerant" when within ±4% of the truth × {1/3, 1/2, 1, 2, 3} (MIREX Accuracy1 / Accuracy2); the key is
exact (tonic and mode), and the MIREX weighted key score gives 0.5 / 0.3 / 0.2 to fifth / relative / parallel errors.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .corpus import INSTRUMENTS, PITCH_CLASSES, SAMPLE_RATE, labels, render, sample_spec, split_seeds

FPS = 100.0  # onset envelope frames per second
MEL_BANDS = 64
MEL_FMAX = 8000.0  # the corpus's Nyquist at 16 kHz: higher bands would not exist in training data
TEMPO_MIN, TEMPO_MAX = 40.0, 240.0  # candidate range of the tempo search, bpm
TEMPO_FLOOR = 58.0  # octave correction never goes below this: listeners rarely tap slower
ACCENT = 1.6  # on/off-beat onset ratio that marks a metrical level (tuned on the "valid" split)

# Krumhansl-Kessler probe-tone profiles (C major / C minor)
KK_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
KK_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def _mono(audio: np.ndarray | torch.Tensor) -> np.ndarray:
    """Any [samples], [1, samples] or [1, 1, samples] -> float32 [samples]."""
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().float().numpy()
    a = np.asarray(audio, dtype=np.float32)
    if a.ndim > 1:
        a = a.reshape(-1, a.shape[-1]).mean(0)
    return a


def _stft_mag(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """|STFT| [frames ≥ 2, n_fft//2+1] with a Hann window, frames centred (reflect-padded; clips shorter than two
    hops are zero-padded, so even an empty clip gives a valid, silent spectrogram)."""
    if len(x) < 2 * hop:
        x = np.pad(x, (0, 2 * hop - len(x)))
    x = np.pad(x, (n_fft // 2, n_fft // 2), mode="reflect" if len(x) > n_fft // 2 else "constant")
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop]
    return np.abs(np.fft.rfft(frames * np.hanning(n_fft).astype(np.float32), axis=1)).astype(np.float32)


@lru_cache(maxsize=16)
def mel_filterbank(sr: int, n_fft: int, n_mels: int = MEL_BANDS, fmin: float = 30.0,
                   fmax: float = MEL_FMAX) -> np.ndarray:
    """Triangular HTK-mel filters [n_fft//2+1, n_mels], area-normalised so a band's value is a mean magnitude."""
    fmax = min(fmax, sr / 2)
    mel = np.linspace(2595 * np.log10(1 + fmin / 700), 2595 * np.log10(1 + fmax / 700), n_mels + 2)
    edges = 700 * (10 ** (mel / 2595) - 1)
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    up = (freqs[:, None] - lo) / (mid - lo)
    down = (hi - freqs[:, None]) / (hi - mid)
    fb = np.maximum(0.0, np.minimum(up, down))
    fb /= np.maximum(fb.sum(0, keepdims=True), 1e-9)
    return fb.astype(np.float32)


def _frame_sizes(sr: int, window_s: float) -> tuple[int, int]:
    """(n_fft, hop): a power-of-two window near `window_s` seconds and a hop of 1/FPS s."""
    return 2 ** int(round(math.log2(window_s * sr))), int(round(sr / FPS))


def log_mel(audio: np.ndarray | torch.Tensor, sr: int) -> np.ndarray:
    """log-mel spectrogram [frames, MEL_BANDS] at FPS frames/s, 64 ms windows, in dB relative to the clip's loudest
    cell (so peak-normalisation and gain do not matter)."""
    x = _mono(audio)
    n_fft, hop = _frame_sizes(sr, 0.064)
    mel = _stft_mag(x, n_fft, hop) @ mel_filterbank(sr, n_fft)
    db = 20 * np.log10(np.maximum(mel, 1e-7))
    return np.maximum(db - db.max(), -80.0)


def onset_envelope(audio: np.ndarray | torch.Tensor, sr: int) -> np.ndarray:
    """Onset strength [frames] at FPS: half-wave rectified log-mel flux summed over bands, minus its local mean."""
    db = log_mel(audio, sr)
    flux = np.maximum(np.diff(db, axis=0), 0.0).mean(1)
    k = max(1, min(int(FPS), len(flux)))  # subtract a 1 s moving average: keeps the rhythm, drops slow changes
    local = np.convolve(flux, np.ones(k) / k, mode="same")[: len(flux)]
    return np.maximum(flux - local, 0.0)


def _tempo_salience(env: np.ndarray, bpms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(autocorrelation, Fourier) tempo salience [len(bpms)] of an onset envelope. The ACF peaks at the beat period
    and its multiples (slower tempi), the Fourier tempogram at the beat rate and its multiples (faster tempi):
    their product keeps the level where both agree."""
    e = env - env.mean()
    n = len(e)
    spec = np.fft.rfft(e, 2 * n)
    acf = np.fft.irfft(np.abs(spec) ** 2)[:n]
    acf /= max(acf[0], 1e-12)
    lags = 60.0 * FPS / bpms
    a = np.interp(lags, np.arange(n), acf)
    # a smoothed ACF: the best value within ±2% of each lag (onset jitter spreads the peak)
    for d in (0.98, 0.99, 1.01, 1.02):
        a = np.maximum(a, np.interp(lags * d, np.arange(n), acf))
    w = e * np.hanning(n)
    n_fft = max(16384, 2 ** int(math.ceil(math.log2(n))))  # 0.37 bpm bins at 100 fps, interpolated
    mag = np.abs(np.fft.rfft(w, n_fft)) / max(np.abs(w).sum(), 1e-12)
    f = np.interp(bpms / 60.0, np.fft.rfftfreq(n_fft, 1.0 / FPS), mag)
    return np.maximum(a, 0.0), f


def _accent_ratio(env: np.ndarray, bpm: float) -> float:
    """How much stronger the onsets on a beat grid at `bpm` (best phase) are than those halfway between its beats.
    ≫1 for a real metrical level whose off-beats are weaker subdivisions; ≈1 for a grid of alternate beats."""
    period = 60.0 * FPS / bpm
    n = len(env)
    if n < 2 * period + 2:
        return 1.0
    e = np.maximum(np.maximum(env, np.roll(env, 1)), np.roll(env, -1))  # ±1 frame: timing jitter
    phases = np.arange(int(math.ceil(period)))[:, None]
    k = np.arange(int((n - 1 - period) // period))[None, :]
    on = np.round(phases + k * period).astype(np.int64)  # [phases, beats]
    best = int(np.argmax(e[on].mean(1)))
    off = np.minimum(np.round(best + period / 2 + k[0] * period).astype(np.int64), n - 1)
    return float(e[on[best]].mean() / max(float(e[off].mean()), 1e-9))


def estimate_tempo(audio: np.ndarray | torch.Tensor, sr: int) -> float:
    """Tempo in bpm from the audio alone; 0.0 for silence or clips under 2 s.

    1. salience = ACF × Fourier tempogram × a log-normal prior (centre 110 bpm, one octave wide) -> best candidate;
    2. octave check with the accent ratio r (on-beat / off-beat onset strength): halve if the grid at half the
       tempo still has clearly weaker off-beats (r ≥ ACCENT, i.e. our beats alternate strong/weak: we were counting
       eighths) and stays ≥ TEMPO_FLOOR; else double if our own off-beats are as strong as our beats (r < ACCENT)."""
    env = onset_envelope(audio, sr)
    if len(env) < 2 * FPS or env.max() <= 0:
        return 0.0
    bpms = np.exp(np.linspace(np.log(TEMPO_MIN), np.log(TEMPO_MAX), 600))
    acf, dft = _tempo_salience(env, bpms)
    prior = np.exp(-0.5 * (np.log2(bpms / 110.0) / 1.0) ** 2)
    score = acf * dft * prior
    i = int(np.argmax(score))
    bpm = float(bpms[i])
    if 0 < i < len(bpms) - 1:  # parabolic refinement on the log-bpm grid
        y0, y1, y2 = score[i - 1], score[i], score[i + 1]
        denom = y0 - 2 * y1 + y2
        off = 0.5 * (y0 - y2) / denom if denom < 0 else 0.0
        bpm = float(np.exp(np.log(bpm) + off * (np.log(bpms[1]) - np.log(bpms[0]))))
    # one octave step at most: two could reach 1/4 or 4x the salience peak
    if bpm / 2 >= TEMPO_FLOOR and _accent_ratio(env, bpm / 2) >= ACCENT:
        bpm /= 2
    elif bpm * 2 <= TEMPO_MAX and _accent_ratio(env, bpm) < ACCENT:
        bpm *= 2
    return bpm


def tempo_correct(estimate: float, truth: float, tolerance: float = 0.04) -> tuple[bool, bool]:
    """(strict, octave-tolerant): within ±tolerance of truth, or of truth × {1/3, 1/2, 1, 2, 3}."""
    strict = abs(estimate - truth) <= tolerance * truth
    octave = any(abs(estimate - truth * m) <= tolerance * truth * m for m in (1 / 3, 0.5, 1.0, 2.0, 3.0))
    return bool(strict), bool(octave)


def chroma(audio: np.ndarray | torch.Tensor, sr: int) -> np.ndarray:
    """Mean pitch-class profile [12] (C first) of the clip: linear STFT magnitudes (256 ms windows) of 55 Hz-1 kHz
    bins, each weighted towards its nearest equal-tempered pitch. Linear magnitude and the 1 kHz ceiling keep
    drums and upper harmonics (a saw's 3rd harmonic is the fifth) from pulling the key towards the dominant."""
    x = _mono(audio)
    n_fft, _ = _frame_sizes(sr, 0.256)
    mag = _stft_mag(x, n_fft, n_fft // 4)
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    band = (freqs >= 55.0) & (freqs <= 1000.0)
    midi = 69 + 12 * np.log2(freqs[band] / 440.0)
    weight = np.exp(-0.5 * ((midi - np.round(midi)) / 0.25) ** 2)  # bins between semitones count little
    to_pc = np.zeros((int(band.sum()), 12), np.float32)
    to_pc[np.arange(band.sum()), np.round(midi).astype(int) % 12] = weight
    return (mag[:, band] @ to_pc).mean(0)


def key_scores(profile: np.ndarray) -> np.ndarray:
    """Pearson correlation [24] of a chroma profile with the KK profiles: rows 0-11 major C..B, 12-23 minor."""
    rolled = np.stack([np.roll(p, k) for p in (KK_MAJOR, KK_MINOR) for k in range(12)])  # [24, 12]
    r = rolled - rolled.mean(1, keepdims=True)
    c = profile - profile.mean()
    return (r @ c) / (np.linalg.norm(r, axis=1) * max(float(np.linalg.norm(c)), 1e-12))


def estimate_key(audio: np.ndarray | torch.Tensor, sr: int) -> tuple[str, str]:
    """(tonic, mode) from the audio alone: the best of 24 Krumhansl-Kessler key profiles against the chroma."""
    i = int(np.argmax(key_scores(chroma(audio, sr))))
    return PITCH_CLASSES[i % 12], ("major", "minor")[i // 12]


def key_score(estimate: tuple[str, str], truth: tuple[str, str]) -> float:
    """MIREX weighted key score: 1 exact, 0.5 a fifth away (same mode), 0.3 relative, 0.2 parallel, else 0."""
    (ek, em), (tk, tm) = estimate, truth
    e, t = PITCH_CLASSES.index(ek), PITCH_CLASSES.index(tk)
    if (e, em) == (t, tm):
        return 1.0
    if em == tm and (e - t) % 12 in (5, 7):
        return 0.5
    if em != tm and ((tm == "major" and (e - t) % 12 == 9) or (tm == "minor" and (e - t) % 12 == 3)):
        return 0.3
    if em != tm and e == t:
        return 0.2
    return 0.0


# ----------------------------------------------------------------------------------------- instrument classifier

def instrument_features(audio: np.ndarray | torch.Tensor, sr: int) -> np.ndarray:
    """Timbre summary [4·MEL_BANDS + 2] float32: per-band mean and std of the log-mel spectrogram, per-band mean
    onset flux and mean decay (how fast bands rise and fall: plucks and pianos decay, organs sustain), plus the
    fraction of near-silent frames and the mean spectral flatness."""
    db = log_mel(audio, sr)  # [frames, bands], dB re the loudest cell
    d = np.diff(db, axis=0)
    loud = db.max(1)
    power = 10 ** (db / 10)
    flat = np.exp(np.log(power + 1e-10).mean(1)) / (power.mean(1) + 1e-10)
    return np.concatenate([db.mean(0) / 80, db.std(0) / 20, np.maximum(d, 0).mean(0) / 5,
                           np.maximum(-d, 0).mean(0) / 5, [(loud < -40).mean(), flat.mean()]]).astype(np.float32)


class InstrumentClassifier:
    """Multinomial logistic regression on standardised `instrument_features`; weights in a safetensors file."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 classes: Sequence[str] = INSTRUMENTS) -> None:
        self.weight, self.bias, self.mean, self.std = weight.float(), bias.float(), mean.float(), std.float()
        self.classes = tuple(classes)

    def logits(self, feats: np.ndarray | torch.Tensor) -> torch.Tensor:
        """feats [N, D] -> logits [N, classes]."""
        x = (torch.as_tensor(np.asarray(feats), dtype=torch.float32) - self.mean) / self.std
        return x @ self.weight.T + self.bias

    def predict_features(self, feats: np.ndarray) -> list[str]:
        return [self.classes[int(i)] for i in self.logits(feats).argmax(1)]

    def predict(self, audio: np.ndarray | torch.Tensor, sr: int) -> str:
        """The instrument family of one clip ([samples] or [1, samples])."""
        return self.predict_features(instrument_features(audio, sr)[None])[0]

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous(), "mean": self.mean.contiguous(),
                   "std": self.std.contiguous()}, str(path), metadata={"classes": json.dumps(list(self.classes)),
                                                                       "features": "instrument_features/v1"})

    @classmethod
    def load(cls, path: str | Path) -> InstrumentClassifier:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("features") != "instrument_features/v1":
                raise ValueError(f"{path} is not an instrument classifier for these features (metadata {meta})")
            t = {k: f.get_tensor(k) for k in ("weight", "bias", "mean", "std")}
        return cls(t["weight"], t["bias"], t["mean"], t["std"], json.loads(meta["classes"]))


def degrade(audio: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    """A random codec-like degradation [samples] -> [samples]: a lowpass at 3-8 kHz (half the time), a spectral
    tilt of ±3 dB/octave, and coloured noise at 15-40 dB SNR. Training on these keeps the classifier's decision on
    the timbre rather than on details that a codec or a generator smears."""
    spec = np.fft.rfft(audio)
    freqs = np.maximum(np.fft.rfftfreq(len(audio), 1.0 / sr), 20.0)
    gain = (freqs / 1000.0) ** (rng.uniform(-3, 3) / 6.02)
    if rng.random() < 0.5:
        gain /= np.sqrt(1.0 + (freqs / rng.uniform(3000, 8000)) ** 8)
    noise = np.fft.rfft(rng.standard_normal(len(audio))) * (freqs / 1000.0) ** (rng.uniform(-1, 0) * 0.5)
    x = np.fft.irfft(spec * gain, len(audio))
    n = np.fft.irfft(noise, len(audio))
    snr_db = rng.uniform(15, 40)
    n *= np.sqrt(np.mean(x ** 2) / max(np.mean(n ** 2), 1e-12)) * 10 ** (-snr_db / 20)
    return (x + n).astype(np.float32)


def corpus_features(seeds: Sequence[int], duration: float, sample_rate: int = SAMPLE_RATE,
                    augment: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Render clips and return (features [N, D], instrument indices [N]); `augment` adds each clip a second time
    through `degrade` (seeded by the clip's seed), so N = 2·len(seeds)."""
    feats, ys = [], []
    for s in seeds:
        spec = sample_spec(s)
        audio = render(spec, duration, sample_rate)
        versions = [audio, degrade(audio, sample_rate, np.random.default_rng([s, 99]))] if augment else [audio]
        for a in versions:
            feats.append(instrument_features(a, sample_rate))
            ys.append(INSTRUMENTS.index(spec.instrument))
    return np.stack(feats), np.array(ys, dtype=np.int64)


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, weight_decay: float = 1e-3, steps: int = 100,
                 seed: int = 0) -> InstrumentClassifier:
    """Full-batch L-BFGS on cross-entropy + L2 (deterministic: no minibatches)."""
    torch.manual_seed(seed)
    xt = torch.as_tensor(x, dtype=torch.float32)
    mean, std = xt.mean(0), xt.std(0).clamp_min(1e-4)
    xs = (xt - mean) / std
    yt = torch.as_tensor(y)
    w = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs @ w.T + b, yt) + weight_decay * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return InstrumentClassifier(w.detach(), b.detach(), mean, std, INSTRUMENTS[:n_classes])


def train_instrument_classifier(n_clips: int = 300, seed: int = 0, duration: float = 4.0,
                                sample_rate: int = SAMPLE_RATE, augment: bool = True) -> InstrumentClassifier:
    """Train the instrument classifier on `n_clips` "train"-split clips of `duration` seconds (block `seed` of the
    split: different seeds see different clips), each also seen once through `degrade` when `augment`.
    The default (300 clips of 4 s) takes ~20 s of CPU on an idle 2-core machine."""
    seeds = split_seeds("train", n_clips * (seed + 1))[seed * n_clips:]
    x, y = corpus_features(seeds, duration, sample_rate, augment=augment)
    return fit_logistic(x, y, len(INSTRUMENTS), seed=seed)


def evaluate(n: int = 100, duration: float = 10.0, sample_rate: int = SAMPLE_RATE, split: str = "test",
             classifier: InstrumentClassifier | None = None) -> dict[str, float]:
    """Accuracy of the estimators on `n` rendered clips of a split: tempo strict / octave-tolerant, key (tonic and
    mode), MIREX key score, mode, instrument (only when a classifier is given), and seconds per clip of analysis."""
    rows, seconds = [], 0.0
    for s in split_seeds(split, n):
        spec = sample_spec(s)
        truth = labels(spec)
        audio = render(spec, duration, sample_rate)
        t0 = time.perf_counter()
        bpm = estimate_tempo(audio, sample_rate)
        key = estimate_key(audio, sample_rate)
        inst = classifier.predict(audio, sample_rate) if classifier is not None else None
        seconds += time.perf_counter() - t0
        strict, octave = tempo_correct(bpm, truth["tempo_bpm"])
        rows.append({"tempo_strict": strict, "tempo_octave": octave, "key": key == (spec.key, spec.mode),
                     "key_mirex": key_score(key, (spec.key, spec.mode)), "mode": key[1] == spec.mode,
                     **({"instrument": inst == spec.instrument} if classifier is not None else {})})
    out = {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0]}
    out["s_per_clip"] = round(seconds / n, 4)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m magnet_engine.train.features [--n 100] [--sr 16000] [--classifier FILE]`: the estimators' accuracy
    on rendered "test" clips; trains the instrument classifier first (saved to --classifier if it does not exist
    yet)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m magnet_engine.train.features", description=main.__doc__)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--sr", type=int, default=SAMPLE_RATE)
    p.add_argument("--split", default="test")
    p.add_argument("--classifier", default=None, help="load from FILE if it exists, else train and save there")
    p.add_argument("--classifier-clips", type=int, default=300)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.classifier and Path(args.classifier).is_file():
        clf = InstrumentClassifier.load(args.classifier)
    else:
        clf = train_instrument_classifier(args.classifier_clips)
        print(f"instrument classifier: trained on {args.classifier_clips} clips in {time.perf_counter() - t0:.1f} s")
        if args.classifier:
            clf.save(args.classifier)
    print(json.dumps(evaluate(args.n, args.duration, args.sr, args.split, clf)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
