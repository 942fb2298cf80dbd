"""End-to-end generation benchmark: `python -m bench e2e --model PRESET|DIR --batch 1,4,16 ...`.

One request = text encoding -> token generation -> codec decode, timed per stage by calling the engine's parts
(`engine.text`, `engine.generate(decode=False)`, `engine.decode`) with device syncs only at the stage boundaries.
Warm-up requests run first and are reported apart (`warmup_s`); `latency_s` holds median / p20 / p80 over the timed
repeats. Each (model, batch) gives one JSON row (bench.schema), appended to `--json FILE`.
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

from . import schema
from .common import (
    StageClock,
    git_sha,
    host,
    parse_generation_sets,
    peak_memory_mb,
    reset_peak_memory,
    summary,
    versions,
)

BACKENDS = ("torch", "triton", "onnx")
ALL_KINDS = ("magnet", "ar", "hf-musicgen")
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
TEXT_NOTE = ("text: random encoder of the named width, run once per prompt per request; its speed barely matters")


def prompts_for(batch: int) -> list[str]:
    """`batch` distinct prompts (cycled with a take number), so every request encodes `batch` texts."""
    return [PROMPTS[i % len(PROMPTS)] + (f", take {i // len(PROMPTS) + 1}" if i >= len(PROMPTS) else "")
            for i in range(batch)]


@dataclass
class Settings:
    """One invocation's settings, shared by every batch size."""

    model: str
    kind: str | None
    backend: str
    device: torch.device
    dtype: torch.dtype
    batches: list[int]
    duration: float
    steps: tuple[int, ...] | None
    repeats: int
    warmup: int
    greedy: bool
    seed: int
    onnx_dir: str | None
    ar_mode: str = "eager"  # MusicGen step: eager | graph (CUDA graph) | compile (torch.compile)
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


def engine_request(engine: Any, prompts: list[str], overrides: dict[str, Any]) -> Callable[[StageClock], int]:
    """One text -> tokens -> audio request on an `engine.api.Engine`, timed per stage."""

    def run_once(clock: StageClock) -> int:
        if hasattr(engine.text, "clear_cache"):
            engine.text.clear_cache()  # every request pays for its text, as a fresh prompt would
        with clock("text"):
            cond = engine.text(prompts)  # [B, L, dim]
        text_fn = engine.text
        engine.text = lambda _prompts: cond  # generate() must not encode (or time) the text a second time
        try:
            with clock("lm"):
                codes = engine.generate(prompts, decode=False, **overrides).codes  # [B, K, T]
        finally:
            engine.text = text_fn
        with clock("codec"):
            engine.decode(codes)  # [B, 1, T·hop]
        return int(codes.shape[-1])

    return run_once


def apply_backend(engine: Any, backend: str) -> Any:
    """torch: as built. triton: `kernels.apply(engine)` swaps the attention op and the sampler."""
    if backend == "triton":
        try:
            import kernels
        except ImportError as e:
            raise ValueError(f"--backend triton needs the kernels package ({e})") from e
        if not hasattr(kernels, "apply"):
            raise ValueError("--backend triton: kernels.apply(engine) is not available in this build yet")
        out = kernels.apply(engine)
        return engine if out is None else out
    return engine


def load_onnx_engine(onnx_dir: str | None, device: torch.device) -> Any:
    """`export.ort.load_engine(dir)`: text, step and codec as onnxruntime sessions."""
    if onnx_dir is None:
        raise ValueError("--backend onnx needs --onnx-dir DIR (an exported model folder)")
    try:
        from export.ort import load_engine
    except ImportError as e:
        raise ValueError(f"--backend onnx: export.ort.load_engine is not available ({e})") from e
    params = inspect.signature(load_engine).parameters
    return load_engine(onnx_dir, device=device) if "device" in params else load_engine(onnx_dir)


def generation_overrides(kind: str, s: Settings) -> dict[str, Any]:
    over: dict[str, Any] = {"duration": s.duration, "seed": s.seed, "greedy": s.greedy}
    if s.steps is not None:
        if kind != "magnet":
            raise ValueError("--steps applies to MAGNeT only (AR models take one step per frame)")
        over["steps"] = s.steps
    return {**over, **s.sets}


def lm_steps(engine: Any, kind: str, overrides: dict[str, Any], frames: int) -> tuple[list[int], int]:
    """-> (steps list, LM passes per request): MAGNeT per-stage steps; AR one step per frame plus the delays."""
    if kind == "magnet":
        steps = [int(x) for x in engine.settings(**overrides).steps]
        return steps, sum(steps)
    n = frames + max(engine.config.delays, default=0)
    return [n], n


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


def run_engine(s: Settings) -> list[dict[str, Any]]:
    """magnet / ar through our engine, any backend: one row per batch size."""
    from .presets import build, lm_params_m

    if s.backend == "onnx":
        engine = load_onnx_engine(s.onnx_dir, s.device)
        kind = "magnet" if engine.config.kind == "magnet" else "ar"
        if s.kind is not None and s.kind != kind:
            raise ValueError(f"{s.onnx_dir} holds a {kind} model, not {s.kind}")
        model, weights, text_enc, params = s.onnx_dir or "", "checkpoint", engine.config.text_encoder, None
        if engine.lm is not None:
            params = lm_params_m(engine.lm)
    else:
        built = build(s.model, s.kind, s.device, s.dtype, s.seed)
        engine = apply_backend(built.engine, s.backend)
        engine.ar_mode = s.ar_mode
        kind, model, weights, text_enc, params = built.kind, built.model, built.weights, built.text_encoder, \
            built.params_m
    overrides = generation_overrides(kind, s)
    notes = TEXT_NOTE if weights == "random" else ""
    rows = []
    for batch in s.batches:
        prompts = prompts_for(batch)
        timed = time_requests(engine_request(engine, prompts, overrides), s.device, s.repeats, s.warmup,
                              lambda frames: lm_steps(engine, kind, overrides, frames))
        rows.append(make_row(s, model=model, kind=kind, backend=s.backend, batch=batch, timed=timed,
                             frame_rate=engine.config.frame_rate, params_m=params, weights=weights,
                             text_encoder=text_enc, notes=notes))
        print_row(rows[-1])
    return rows


def print_row(row: dict[str, Any]) -> None:
    lat, st = row["latency_s"], row["stages_s"]
    print(f"{row['scenario']}: median {lat['median']:.3f}s (p20 {lat['p20']:.3f}, p80 {lat['p80']:.3f}) | "
          f"text {st['text']:.3f} lm {st['lm']:.3f} codec {st['codec']:.3f} | "
          f"{row['audio_s_per_s']:.3f} audio-s/s | cpu {row['cpu_s']:.3f}s | peak {row['peak_mem_mb']:.0f} MB | "
          f"warm-up {', '.join(f'{w:.2f}' for w in row['warmup_s']) or '-'} s", flush=True)


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} takes comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{what} takes positive integers, got {text!r}")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="preset (random weights: magnet-small-10secs, magnet-medium-10secs, musicgen-small, "
                        "musicgen-medium, tiny) or a local checkpoint folder (engine.load). Default: tiny")
    p.add_argument("--kind", choices=ALL_KINDS, default=None,
                   help="magnet | ar (our engine) | hf-musicgen (transformers peer). Default: the preset's")
    p.add_argument("--backend", choices=BACKENDS, default="torch")
    p.add_argument("--onnx-dir", default=None, help="exported model folder for --backend onnx")
    p.add_argument("--device", default=None, help="cpu | cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="LM layer dtype (default: float16 on CUDA, float32 on CPU)")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,4,16")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of audio per sample")
    p.add_argument("--steps", default=None, help="MAGNeT steps per stage, e.g. 20,10,10,10 (default: model's)")
    p.add_argument("--repeats", type=int, default=3, help="timed requests per batch size")
    p.add_argument("--warmup", type=int, default=1, help="untimed-in-latency warm-up requests per batch size")
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling (hf: do_sample=False)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ar-mode", choices=("eager", "graph", "compile"), default=Settings.ar_mode,
                   help="AR (MusicGen) step: eager, a CUDA graph, or torch.compile (graph needs CUDA)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="GenerationConfig field, JSON value (e.g. cfg=[3,1], temperature=1.5); repeatable")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", default=None, help="append rows as JSON lines to FILE ('-' = stdout)")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    from engine.api import default_device, parse_dtype

    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    if args.duration <= 0:
        raise ValueError(f"--duration must be > 0 seconds, got {args.duration}")
    steps = tuple(parse_ints(args.steps, "--steps")) if args.steps else None
    return Settings(model=args.model, kind=args.kind, backend=args.backend, device=device,
                    dtype=parse_dtype(args.dtype, device), batches=parse_ints(args.batch, "--batch"),
                    duration=args.duration, steps=steps, repeats=args.repeats, warmup=args.warmup,
                    greedy=args.greedy, seed=args.seed, onnx_dir=args.onnx_dir, ar_mode=args.ar_mode,
                    sets=parse_generation_sets(args.sets))


def run(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Parse, run every batch size, write rows. Raises ValueError (and friends) on bad input."""
    args = parser().parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    s = settings_from(args)
    if args.kind == "hf-musicgen":
        if s.backend != "torch":
            raise ValueError("--kind hf-musicgen runs transformers' own PyTorch model: use --backend torch")
        from .peer import run_peer

        rows = run_peer(s)
    else:
        rows = run_engine(s)
    if args.json == "-":
        for r in rows:
            print(schema.json_line(r))
    elif args.json:
        schema.append_rows(args.json, rows)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run(argv)
    except (ValueError, TypeError, OSError, ImportError, NotImplementedError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"bench e2e: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
