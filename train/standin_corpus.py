"""A minimal stand-in with `train.corpus`'s API (used only while that module is absent): a kick/hat pattern and a
bass line at a random tempo, captioned from their parameters."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16000
_SPLIT_BASE = {"train": 0, "valid": 10_000_000, "test": 20_000_000}


@dataclass(frozen=True)
class ClipSpec:
    seed: int
    bpm: float
    root_hz: float
    bright: bool


def sample_spec(seed: int) -> ClipSpec:
    rng = np.random.default_rng(seed)
    return ClipSpec(seed, float(rng.uniform(80, 160)), float(rng.uniform(40, 90)), bool(rng.random() < 0.5))


def render(spec: ClipSpec, duration: float = 10.0, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """-> [samples] float32 in [-1, 1]."""
    rng = np.random.default_rng(spec.seed + 1)
    n = int(round(duration * sample_rate))
    t = np.arange(n) / sample_rate
    beat = 60.0 / spec.bpm
    phase = (t % beat) / beat
    kick = np.sin(2 * np.pi * 50 * (t % beat) * (1 + 3 * np.exp(-40 * (t % beat)))) * np.exp(-8 * phase)
    hat = rng.standard_normal(n) * np.exp(-60 * ((t + beat / 2) % beat)) * (0.3 if spec.bright else 0.1)
    bass = 0.4 * np.sign(np.sin(2 * np.pi * spec.root_hz * t)) * np.exp(-3 * phase)
    wav = kick + hat + bass
    return (0.8 * wav / max(1e-6, float(np.abs(wav).max()))).astype(np.float32)


def caption(spec: ClipSpec, rng: np.random.Generator) -> str:
    speed = "fast" if spec.bpm > 125 else "slow" if spec.bpm < 100 else "steady"
    tone = "bright" if spec.bright else "dark"
    forms = [f"a {speed} {tone} beat with bass", f"{tone} drums at a {speed} tempo", f"a {speed} beat, {tone} hats"]
    return forms[int(rng.integers(len(forms)))]


def split_seeds(split: str, n: int) -> list[int]:
    return [_SPLIT_BASE[split] + i for i in range(n)]
