"""What the end-to-end benchmarks share: the prompts, one invocation's settings, timing a request, the schema row.

Used by bench.e2e (our engine) and bench.peer (transformers' MusicGen), which import this and not each other.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

from . import schema
from .common import StageClock, git_sha, host, peak_memory_mb, reset_peak_memory, summary, versions

PROMPTS = (
    "80s pop track with bassy drums and synth",
    "90s rock song with loud guitars and heavy drums",
    "lofi slow bpm electro chill with organic samples",
    "a light and cheerly EDM track, with syncopated drums, aery pads, and strong emotions",
    "earthy tones, environmentally conscious, ukulele-infused, harmonic, breezy, easygoing, organic instrumentation",
    "a grand orchestral arrangement with thunderous percussion, epic brass fanfares, and soaring strings",
    "smooth jazz with a saxophone solo, walking bass and brushed drums",
    "ambient drone with evolving pads and distant piano",
)

def prompts_for(batch: int) -> list[str]:
    """`batch` distinct prompts (cycled with a take number), so every request encodes `batch` texts."""
    return [PROMPTS[i % len(PROMPTS)] + (f", take {i // len(PROMPTS) + 1}" if i >= len(PROMPTS) else "")
            for i in range(batch)]


@dataclass
class Settings:
    """One invocation's settings, shared by every batch size."""

    model: str
    kind: str | None
    backend: str | None  # None: the model's (onnx for an export folder, else torch)
    device: torch.device
    dtype: torch.dtype  # resolved, for the rows
    dtype_arg: str | None  # as given (None: the device's default, or an export's own)
    batches: list[int]
    duration: float
    steps: tuple[int, ...] | None
    repeats: int
    warmup: int
    greedy: bool
    seed: int
    cuda_graph: bool = False  # whole programs captured per request shape (Engine.set_graph; CUDA)
    sets: dict[str, Any] = field(default_factory=dict)  # further GenerationConfig fields (--set KEY=VALUE)


@dataclass
class Timed:
    """What one scenario measured, before it becomes a row."""

    latencies: list[float]
    warmups: list[float]
    stages: list[dict[str, float]]
    cpu: list[float]  # process CPU seconds of each timed request
    frames: int
    steps: list[int]
    passes: int
    peak_mb: float


def time_requests(run_once: Callable[[StageClock], int], device: torch.device, repeats: int, warmup: int,
                  steps: Callable[[int], tuple[list[int], int]]) -> Timed:
    """Run `warmup` + `repeats` requests; `run_once(clock)` times its stages on `clock` and returns the frames made;
    `steps(frames)` -> (steps list, LM passes). Process CPU time is taken per request too: on a shared machine it
    is what the request cost, whatever else was running."""
    reset_peak_memory(device)
    warmups, latencies, stages, cpu = [], [], [], []
    frames = 0
    for i in range(warmup + repeats):
        clock = StageClock(device)
        c0 = time.process_time()
        frames = run_once(clock)
        cpu_s = time.process_time() - c0
        total = sum(clock.seconds.values())  # stages run back to back: their sum is the request's wall time
        if i < warmup:
            warmups.append(total)
        else:
            latencies.append(total)
            stages.append(dict(clock.seconds))
            cpu.append(cpu_s)
    step_list, passes = steps(frames)
    return Timed(latencies, warmups, stages, cpu, frames, step_list, passes, peak_memory_mb(device))


def make_row(s: Settings, *, model: str, kind: str, backend: str, batch: int, timed: Timed, frame_rate: float,
             params_m: float | None, weights: str, text_encoder: str, notes: str) -> dict[str, Any]:
    """Assemble and validate one schema row."""
    lat = summary(timed.latencies)
    stage_names = ("text", "lm", "codec")
    stages = {k: summary([st.get(k, 0.0) for st in timed.stages])["median"] for k in stage_names}
    audio_s = timed.frames / frame_rate
    dtype = str(s.dtype).removeprefix("torch.")
    row = {
        "schema": schema.SCHEMA_VERSION,
        "scenario": f"e2e/{model}/{kind}/{backend}/{s.device.type}/{dtype}/b{batch}/{s.duration:g}s"
                    + ("" if s.steps is None else "/steps" + "-".join(map(str, s.steps)))
                    + "".join(f"/{k}={v}" for k, v in s.sets.items()),
        "model": model, "kind": kind, "backend": backend, "device": str(s.device), "dtype": dtype,
        "batch": batch, "duration_s": s.duration, "audio_s": round(audio_s, 4), "frames": timed.frames,
        "steps": timed.steps, "passes": timed.passes, "repeats": len(timed.latencies), "warmup": len(timed.warmups),
        "latency_s": lat, "warmup_s": timed.warmups, "stages_s": stages, "cpu_s": summary(timed.cpu)["median"],
        "audio_s_per_s": batch * audio_s / lat["median"], "samples_per_s": batch / lat["median"],
        "peak_mem_mb": round(timed.peak_mb, 1), "params_m": params_m, "weights": weights,
        "text_encoder": text_encoder, "git_sha": git_sha(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(), "host": host(), "notes": notes,
    }
    return schema.validate_row(row)


def print_row(row: dict[str, Any]) -> None:
    lat, st = row["latency_s"], row["stages_s"]
    print(f"{row['scenario']}: median {lat['median']:.3f}s (p20 {lat['p20']:.3f}, p80 {lat['p80']:.3f}) | "
          f"text {st['text']:.3f} lm {st['lm']:.3f} codec {st['codec']:.3f} | "
          f"{row['audio_s_per_s']:.3f} audio-s/s | cpu {row['cpu_s']:.3f}s | peak {row['peak_mem_mb']:.0f} MB | "
          f"warm-up {', '.join(f'{w:.2f}' for w in row['warmup_s']) or '-'} s", flush=True)
