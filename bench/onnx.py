"""onnxruntime vs torch eager on CPU, same model and settings:
`python -m magnet_engine.bench onnx [--model M] [--export-dir DIR]`.

For each backend the same greedy request runs `--repeats` times after `--warmup` requests:
  * tokens: `generate(decode=False)` with the prompts' text embeddings cached (decoding loop + cross k/v);
    steps/s = decoding steps per request / median seconds;
  * e2e: text cache cleared, `generate()` with decode: text encoder -> tokens -> codec audio;
  * step ms: one call of the step function alone (the model's forward on [cond; uncond], no sampling).
onnxruntime runs once per graph optimisation level (disable / basic / extended / all) and once more with the
`onnxruntime.transformers` optimizer's fusions applied to lm_step.onnx (when it finds any). Every variant's tokens
are compared with torch's (greedy decoding is deterministic, so they should be identical in fp32).

Without `--export-dir` the model is exported to a temporary folder first (about a minute for the fixture).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / ".." / "shared" / "fixtures" / "magnet-tiny"
PROMPTS = ("upbeat electronic dance track with a heavy bass line at 128 bpm", "slow sad piano",
           "smooth jazz with a saxophone solo, walking bass and brushed drums", "ambient drone with distant piano")
LEVELS = ("disable", "basic", "extended", "all")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m magnet_engine.bench onnx", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="torch model (folder or HF id); default: the export's source, "
                   "else the tiny fixture")
    p.add_argument("--export-dir", default=None, help="an existing `magnet export` folder (default: export --model "
                   "to a temporary folder)")
    p.add_argument("--batch", type=int, default=2, help="prompts per request (default 2)")
    p.add_argument("--duration", type=float, default=None, help="seconds of audio (default: the model's segment)")
    p.add_argument("--steps", default=None, help="decoding steps per codebook, e.g. 20,10,10,10 (default: model's)")
    p.add_argument("--repeats", type=int, default=5, help="timed requests per backend (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests first")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="intra-op threads for torch and onnxruntime alike (default: torch's)")
    p.add_argument("--levels", default=",".join(LEVELS), help=f"ORT graph optimisation levels, from {LEVELS}")
    p.add_argument("--no-fusion", action="store_true", help="skip the onnxruntime.transformers optimizer variant")
    p.add_argument("--json", default=None, help="append one JSON line per variant to this file")
    return p


def _session_options(level: str, threads: int, spin: bool = True) -> Any:
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1  # the graphs are one chain of ops: parallel execution only adds overhead
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    # idle pool threads spin-wait by default: fast on a quiet machine, but they fight the decoding loop's torch
    # ops (and other processes) for cores on a busy one
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return so


def _describe(so: Any) -> str:
    return (f"graph_optimization_level={so.graph_optimization_level.name} intra_op_num_threads="
            f"{so.intra_op_num_threads} inter_op_num_threads={so.inter_op_num_threads} execution_mode="
            f"{so.execution_mode.name} enable_mem_pattern={so.enable_mem_pattern} "
            f"enable_cpu_mem_arena={so.enable_cpu_mem_arena} "
            f"session.intra_op.allow_spinning={so.get_session_config_entry('session.intra_op.allow_spinning')}")


def _measure(eng: Any, prompts: list[str], gen: dict[str, Any], repeats: int, warmup: int
             ) -> tuple[dict[str, float], torch.Tensor]:
    """-> ({tokens_s, e2e_s (medians), steps_per_s}, the tokens of the last request)."""
    for _ in range(warmup):
        eng.generate(prompts, **gen)
    tokens_s, e2e_s = [], []
    codes = torch.empty(0)
    for _ in range(repeats):
        t0 = time.perf_counter()
        codes = eng.generate(prompts, decode=False, **gen).codes
        tokens_s.append(time.perf_counter() - t0)
        eng.text.clear_cache()  # end-to-end includes encoding the prompts
        t0 = time.perf_counter()
        eng.generate(prompts, **gen)
        e2e_s.append(time.perf_counter() - t0)
    settings = eng.settings(**gen)
    tok = statistics.median(tokens_s)
    return {"tokens_s": tok, "e2e_s": statistics.median(e2e_s), "steps_per_s": sum(settings.steps) / tok,
            "step_ms": _step_ms(eng, prompts, settings)}, codes


def _step_ms(eng: Any, prompts: list[str], settings: Any, calls: int = 20) -> float:
    """Median ms of one step-function call alone (stage 1, all frames masked): the model without the loop."""
    from magnet_engine.engine.magnet import output_frames

    cfg = eng.config
    step = eng.make_step(eng.text(prompts))
    codes = torch.full((len(prompts), cfg.n_q, output_frames(cfg, settings)), cfg.card, dtype=torch.long)
    step(codes, 1, settings.guided)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        step(codes, 1, settings.guided)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _fused_step(export_dir: Path, manifest: dict[str, Any], so: Any, work: Path) -> tuple[Any, str] | None:
    """lm_step.onnx through onnxruntime.transformers' optimizer (BERT-style fusions: attention, GELU, layer norm,
    skip layer norm). -> (session, fused-op summary) or None when it fuses nothing."""
    import onnxruntime as ort
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = manifest["model_config"]
    logging.disable(logging.WARNING)  # symbolic shape inference warns it cannot order `batch` and `2*batch`
    try:
        opt = optimize_model(str(export_dir / "lm_step.onnx"), model_type="bert", num_heads=cfg["num_heads"],
                             hidden_size=cfg["dim"], opt_level=0)
    finally:
        logging.disable(logging.NOTSET)
    stats = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    if not stats:
        return None
    path = work / "lm_step.fused.onnx"
    opt.save_model_to_file(str(path))
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]), json.dumps(stats)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit code (2 for usage errors, 1 for failures)."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    levels = [lv.strip() for lv in args.levels.split(",") if lv.strip()]
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad or args.batch < 1 or args.repeats < 1 or args.threads < 1:
        print(f"bench onnx: error: bad --levels {bad} (choose from {LEVELS}) or non-positive --batch/--repeats/"
              "--threads", file=sys.stderr)
        return 2
    try:
        return _run(args, levels)
    except (ValueError, TypeError, OSError) as e:
        print(f"bench onnx: error: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, levels: list[str]) -> int:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        return _bench(args, levels, Path(tmp))


def _bench(args: argparse.Namespace, levels: list[str], work: Path) -> int:
    import onnxruntime as ort
    from magnet_engine.export.manifest import read_manifest
    from magnet_engine.export.onnx_export import export_model
    from magnet_engine.export.ort import OrtStep, load_engine

    import magnet_engine as me

    if args.export_dir is None:
        model = args.model or str(FIXTURE)
        export_dir = work / "export"
        print(f"exporting {model} to {export_dir} ...", flush=True)
        export_model(model, export_dir)
    else:
        export_dir = Path(args.export_dir)
    manifest = read_manifest(export_dir)
    model = args.model or manifest["source"]["model"]
    prompts = [PROMPTS[i % len(PROMPTS)] + (f" #{i}" if i >= len(PROMPTS) else "") for i in range(args.batch)]
    gen: dict[str, Any] = {"greedy": True}
    if args.duration is not None:
        gen["duration"] = args.duration
    if args.steps:
        gen["steps"] = tuple(int(s) for s in args.steps.split(","))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"model {model} | export {export_dir} ({manifest['dtype']}, opset {manifest['opset']}) | batch "
          f"{args.batch} | settings {gen} | repeats {args.repeats} (median), warmup {args.warmup}")
    print(f"host {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load avg {load:.2f} | torch "
          f"{torch.__version__} threads {torch.get_num_threads()} | onnxruntime {ort.__version__}")
    if load > (os.cpu_count() or 1) and args.threads > 1:
        print(f"note: the host is oversubscribed (load {load:.1f} on {os.cpu_count()} cores); multi-threaded "
              "timings then mostly measure waiting for cores: compare with --threads 1")

    rows: list[dict[str, Any]] = []

    def report(name: str, res: dict[str, float], codes: torch.Tensor, ref: torch.Tensor | None) -> None:
        same = "-" if ref is None else ("yes" if torch.equal(codes, ref) else "NO")
        base = rows[0]["steps_per_s"] if rows else res["steps_per_s"]
        print(f"{name:<38} {res['steps_per_s']:9.2f} {res['tokens_s']:10.4f} {res['e2e_s']:9.4f} "
              f"{res['step_ms']:8.2f} {res['steps_per_s'] / base:7.2f}x {same:>7}", flush=True)
        rows.append({"variant": name, **res, "tokens_equal_torch": same})

    torch_eng = me.load(model, device="cpu", dtype="float32")
    header = (f"{'backend':<38} {'steps/s':>9} {'tokens s':>10} {'e2e s':>9} {'step ms':>8} {'vs torch':>8} "
              f"{'tokens=':>7}")
    print(header + "\n" + "-" * len(header))
    res, ref = _measure(torch_eng, prompts, gen, args.repeats, args.warmup)
    report("torch eager (fp32)", res, ref, None)
    del torch_eng

    options: dict[str, str] = {}
    for level in levels:
        so = _session_options(level, args.threads)
        options[level] = _describe(so)
        eng = load_engine(export_dir, session_options=so, verify=False)
        res, codes = _measure(eng, prompts, gen, args.repeats, args.warmup)
        report(f"onnxruntime level={level}", res, codes, ref)
    if "all" in levels:
        so = _session_options("all", args.threads, spin=False)
        options["all, no spinning"] = _describe(so)
        eng = load_engine(export_dir, session_options=so, verify=False)
        res, codes = _measure(eng, prompts, gen, args.repeats, args.warmup)
        report("onnxruntime level=all, no spinning", res, codes, ref)
    fusion_note = "skipped (--no-fusion)"
    if not args.no_fusion:
        so = _session_options("all", args.threads)
        fused = _fused_step(export_dir, manifest, so, work)
        if fused is None:
            fusion_note = ("onnxruntime.transformers found no attention/GELU/LayerNorm pattern to fuse in "
                           "lm_step.onnx: the dynamo exporter already emits LayerNormalization, and its attention "
                           "subgraph is not the BERT/GPT-2 pattern the fusions match")
        else:
            session, fusion_note = fused
            eng = load_engine(export_dir, session_options=so, verify=False)
            step = eng.make_step
            eng.make_step = OrtStep(step.cross_kv, session, step.kv_names, step.device)
            res, codes = _measure(eng, prompts, gen, args.repeats, args.warmup)
            report("onnxruntime all + transformers fusion", res, codes, ref)
            fusion_note = "fused ops " + fusion_note
    print("\nsession options:")
    for level, desc in options.items():
        print(f"  {level}: {desc}")
    print(f"transformers optimizer: {fusion_note}")
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps({"bench": "onnx", "model": str(model), "batch": args.batch, "settings": gen,
                                    "threads": args.threads, "load_avg_1m": load, **row}, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
