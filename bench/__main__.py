"""`python -m magnet_engine.bench <subcommand> [args]`: one entry point for every benchmark.

    e2e      end-to-end generation latency/throughput (bench.e2e)
    report   JSON lines -> Markdown table + PNG plots (bench.report)
    kernels  Triton kernel micro-benchmarks (bench.kernels)
    onnx     ONNX export / onnxruntime benchmarks (bench.onnx)
    quant    int8 vs fp32 ONNX exports: size, speed, logits, tokens (bench.quant)
    band     the torch path's banded attention vs a dense band mask (bench.band)
    levers   latency of rescoring / Hybrid-MAGNeT vs plain MAGNeT and AR (bench.levers)
    quality  prompt adherence: tempo / key / instrument measured from the audio (bench.quality)
    load     many requests at once: one at a time vs static batching vs the scheduler (bench.load)
    serve    HTTP load on a running `magnet serve`: open / closed loop, errors by status, a replica kill (bench.serve)
    long     long-form pieces: time to first audio, seams, prompt kept per window (bench.long)
    overhead host overhead per decoding step on CPU: ops, host syncs, ms, what compiles (bench.overhead)
    precision half precision vs fp32: logits error, greedy tokens; mixed rule vs half residual (bench.precision)
    compile  torch.compile of the scheduler's LM pass on a CPU: speed, compile time cold / warm cache (bench.compile)
    web      the web page in headless Chromium (WASM, 1/2 threads) vs the Node client, one request (bench.web)

Step-function micro-benchmarks run under pytest-benchmark: `python -m pytest bench/micro.py --benchmark-only`.
Subcommand modules are imported lazily, so `report` never imports torch's heavy friends and a missing optional
module only breaks its own subcommand.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS = {
    "e2e": ("magnet_engine.bench.e2e", "end-to-end generation: text -> tokens -> audio"),
    "report": ("magnet_engine.bench.report", "JSON lines -> Markdown table and PNG plots"),
    "kernels": ("magnet_engine.bench.kernels", "Triton kernel micro-benchmarks"),
    "onnx": ("magnet_engine.bench.onnx", "ONNX export and onnxruntime benchmarks"),
    "quant": ("magnet_engine.bench.quant", "int8 vs fp32 ONNX exports: size, speed, logit error, token agreement"),
    "band": ("magnet_engine.bench.band", "banded attention (torch path) vs SDPA with a dense band mask"),
    "levers": ("magnet_engine.bench.levers", "latency of the quality levers: rescoring, hybrid, AR"),
    "quality": ("magnet_engine.bench.quality", "prompt adherence: tempo / key / instrument measured from the audio"),
    "load": ("magnet_engine.bench.load", "many requests at once: one at a time, static batching, the scheduler"),
    "serve": ("magnet_engine.bench.serve",
              "HTTP load on magnet serve: open/closed loop, latency, errors by status, faults"),
    "long": ("magnet_engine.bench.long", "long-form pieces: time to first audio, seams, prompt kept per window"),
    "overhead": ("magnet_engine.bench.overhead",
                 "host overhead per decoding step on CPU: aten ops, host syncs, ms, what compiles"),
    "precision": ("magnet_engine.bench.precision", "half precision vs fp32: logits error and greedy tokens"),
    "compile": ("magnet_engine.bench.compile",
                "torch.compile of the scheduler's LM pass: ms per pass, compile time with a cold / warm cache"),
    "web": ("magnet_engine.bench.web", "the web page in headless Chromium (WASM) vs the Node client"),
}


def usage() -> str:
    lines = ["usage: python -m magnet_engine.bench <subcommand> [args]   (<subcommand> --help for its own)", ""]
    lines += [f"  {name:<8} {desc}" for name, (_, desc) in SUBCOMMANDS.items()]
    lines += ["", "micro-benchmarks: python -m pytest bench/micro.py --benchmark-only"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"bench: error: unknown subcommand {name!r}; choose one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module_name = SUBCOMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:  # a dependency of the module is missing, not the module itself
            print(f"bench {name}: error: {module_name} needs {e.name!r}, which is not installed", file=sys.stderr)
        else:
            print(f"bench {name}: error: {module_name} is not available in this build", file=sys.stderr)
        return 2
    entry = getattr(module, "main", None)
    if entry is None:
        print(f"bench {name}: error: {module_name} has no main(argv)", file=sys.stderr)
        return 2
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
