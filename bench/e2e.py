"""End-to-end generation benchmark: `python -m magnet_engine.bench e2e --model PRESET|DIR --batch 1,4,16 ...`.

One request = text encoding -> token generation -> codec decode, timed per stage by calling the engine's parts
(`engine.text`, `engine.generate(decode=False)`, `engine.decode`) with device syncs only at the stage boundaries.
Warm-up requests run first and are reported apart (`warmup_s`); `latency_s` holds median / p20 / p80 over the timed
repeats. Each (model, batch) gives one JSON row (bench.schema), appended to `--json FILE`.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import schema
from .common import StageClock, parse_generation_sets, report_capture_failures
from .timing import Settings, make_row, print_row, prompts_for, time_requests

ALL_KINDS = ("magnet", "ar", "hf-musicgen")
TEXT_NOTE = ("text: random encoder of the named width, run once per prompt per request; its speed barely matters")


def engine_request(engine: Any, prompts: list[str], overrides: dict[str, Any]) -> Callable[[StageClock], int]:
    """One text -> tokens -> audio request on an `engine.api.Engine`, timed per stage (checked once, here)."""
    request = engine.request(prompts, **overrides)

    def run_once(clock: StageClock) -> int:
        if hasattr(engine.text, "clear_cache"):
            engine.text.clear_cache()  # every request pays for its text, as a fresh prompt would
        with clock("text"):
            cond = engine.text(prompts)  # [B, L, dim]
        text_fn = engine.text
        engine.text = lambda _prompts: cond  # generate() must not encode (or time) the text a second time
        try:
            with clock("lm"):
                codes = engine.generate(request, decode=False).codes  # [B, K, T]
        finally:
            engine.text = text_fn
        with clock("codec"):
            engine.decode(codes)  # [B, 1, T·hop]
        return int(codes.shape[-1])

    return run_once


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


def run_engine(s: Settings) -> tuple[list[dict[str, Any]], list[str]]:
    """magnet / ar through our engine, any backend (engine.backends): one row per batch size, and the reasons of any
    CUDA graph capture that failed (`Engine.capture_failures`: those requests ran eagerly)."""
    from .presets import build

    built = build(s.model, s.kind, s.device, s.dtype_arg, s.seed, backend=s.backend)
    engine = built.engine
    engine.set_graph(s.cuda_graph)
    overrides = generation_overrides(built.kind, s)
    notes = TEXT_NOTE if built.weights == "random" else ""
    rows: list[dict[str, Any]] = []
    capture_failures: list[str] = []
    for batch in s.batches:
        print(f"bench e2e: {built.model} ({built.weights} weights) {built.kind} on {engine.backend}, batch {batch}: "
              f"{s.warmup} warm-up + {s.repeats} timed requests of {s.duration:g}s...", file=sys.stderr, flush=True)
        prompts = prompts_for(batch)
        timed = time_requests(engine_request(engine, prompts, overrides), s.device, s.repeats, s.warmup,
                              lambda frames: lm_steps(engine, built.kind, overrides, frames))
        backend, row_notes = engine.backend, notes
        if engine.graph:  # its own scenario; the capture is paid by the warm-up request
            backend += "+graph"
            failed = engine.capture_failures()
            row_notes = f"{notes}; " * bool(notes) + (f"whole-program CUDA graphs: {engine.programs.captures} "
                                                      f"captured in {engine.programs.capture_s:.2f} s so far, "
                                                      f"{len(failed)} failed")
            capture_failures += failed
        rows.append(make_row(s, model=built.model, kind=built.kind, backend=backend, batch=batch,
                             timed=timed, frame_rate=engine.config.frame_rate, params_m=built.params_m,
                             weights=built.weights, text_encoder=built.text_encoder, notes=row_notes))
        print_row(rows[-1])
    return rows, capture_failures


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} takes comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{what} takes positive integers, got {text!r}")
    return values


def parser() -> argparse.ArgumentParser:
    from magnet_engine.engine.backends import names as backend_names

    p = argparse.ArgumentParser(prog="python -m magnet_engine.bench e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="a preset: random weights at a released model's shapes (magnet-small-10secs, "
                        "magnet-medium-10secs, musicgen-small, musicgen-medium, tiny), or what magnet_engine.load "
                        "reads: default (the shipped model), default-ar, a local checkpoint or ONNX export folder. "
                        "Default: tiny")
    p.add_argument("--kind", choices=ALL_KINDS, default=None,
                   help="magnet | ar (our engine) | hf-musicgen (transformers peer). Default: the preset's")
    p.add_argument("--backend", choices=backend_names(), default=None,
                   help="default: the model's (onnx for an ONNX export folder, else torch)")
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
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture each request shape's whole program (MAGNeT: every step; AR: the frame loop) as one "
                        "CUDA graph, replayed per request (the warm-up request pays the capture)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="GenerationConfig field, JSON value (e.g. cfg=[3,1], temperature=1.5); repeatable")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", default=None, help="append rows as JSON lines to FILE ('-' = stdout)")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    from magnet_engine.engine.api import parse_device, parse_dtype
    from magnet_engine.engine.config import GenerationConfig

    device = parse_device(args.device)
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    GenerationConfig.check_fields({"duration": args.duration})  # the peer (hf-musicgen) builds no engine request
    steps = tuple(parse_ints(args.steps, "--steps")) if args.steps else None
    return Settings(model=args.model, kind=args.kind, backend=args.backend, device=device,
                    dtype=parse_dtype(args.dtype, device), dtype_arg=args.dtype,
                    batches=parse_ints(args.batch, "--batch"),
                    duration=args.duration, steps=steps, repeats=args.repeats, warmup=args.warmup,
                    greedy=args.greedy, seed=args.seed, cuda_graph=args.cuda_graph,
                    sets=parse_generation_sets(args.sets))


def run(argv: Sequence[str] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Parse, run every batch size, write rows -> (rows, capture failures). Raises ValueError (and friends) on bad
    input."""
    args = parser().parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    s = settings_from(args)
    if args.kind == "hf-musicgen":
        if s.backend not in (None, "torch"):
            raise ValueError("--kind hf-musicgen runs transformers' own PyTorch model: use --backend torch")
        from .peer import run_peer

        rows, failures = run_peer(s), []
    else:
        rows, failures = run_engine(s)
    if args.json == "-":
        for r in rows:
            print(schema.json_line(r))
    elif args.json:
        schema.append_rows(args.json, rows)
    return rows, failures


def main(argv: Sequence[str] | None = None) -> int:
    try:
        _, failures = run(argv)
    except (ValueError, TypeError, OSError, ImportError, NotImplementedError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"bench e2e: error: {msg}", file=sys.stderr)
        return 2
    return report_capture_failures("e2e", failures)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
