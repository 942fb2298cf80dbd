"""`python -m magnet_engine.bench levers`: latency of the paper's quality levers on the same models and prompts —
plain MAGNeT, MAGNeT rescored by an AR model, Hybrid-MAGNeT with AR prefixes, and the AR model alone (defaults: the
shipped
`default` and `default-ar`). Prints a Markdown table; median of --repeats after one warm-up request."""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch


def main(argv: Sequence[str] | None = None) -> int:
    import magnet_engine as me

    p = argparse.ArgumentParser(prog="python -m magnet_engine.bench levers", description=__doc__)
    p.add_argument("--model", default="default")
    p.add_argument("--ar-model", default="default-ar")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--prefixes", default="1,3", help="hybrid prefix seconds")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    mag = me.load(args.model, device=args.device)
    ar = me.load(args.ar_model, device=args.device)
    variants = [("MAGNeT", mag, {}), ("MAGNeT + AR rescoring (W=0.5)", mag, {"rescorer": ar})]
    variants += [(f"Hybrid, {s:g} s AR prefix", mag, {"ar_model": ar, "hybrid_prefix": s})
                 for s in map(float, args.prefixes.split(","))]
    variants.append(("AR alone", ar, {}))
    print(f"models {args.model} + {args.ar_model}, {args.duration:g} s, device {args.device}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}\n")
    print("| variant | batch | latency s (median) | s per sample |\n|---|---|---|---|")
    for batch in map(int, args.batch.split(",")):
        prompts = [f"upbeat {100 + 5 * i} bpm house beat with a deep bass" for i in range(batch)]
        for name, eng, kw in variants:
            times = []
            for i in range(args.repeats + 1):
                t0 = time.perf_counter()
                eng.generate(prompts, duration=args.duration, seed=i, **kw)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times[1:])
            print(f"| {name} | {batch} | {med:.2f} | {med / batch:.2f} |", flush=True)
    return 0
