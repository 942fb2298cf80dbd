"""`python -m magnet_engine.bench band`: the torch path's banded attention (engine.ops.band_attention) against SDPA
with a dense [T, T] boolean band mask and full attention, on CPU or GPU, for a few query-block sizes
(engine.ops.BAND_BLOCK)."""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from magnet_engine.engine import ops


def _median_ms(fn, repeats: int) -> float:  # noqa: ANN001 - a zero-argument callable
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m magnet_engine.bench band", description=__doc__)
    p.add_argument("--n", type=int, default=2, help="rows (2B under guidance)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--t", type=int, default=500)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--blocks", default="8,16,32,64")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(args.n, args.heads, args.t, 64, generator=g).to(args.device) for _ in range(3))
    mask = ops.band_mask(args.t, args.window, args.device)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    rows = [("SDPA, dense [T, T] band mask", _median_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                                          args.repeats), 0.0),
            ("SDPA, full (no band)", _median_ms(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats), None)]
    default = ops.BAND_BLOCK
    try:
        for block in (int(b) for b in args.blocks.split(",")):
            ops.BAND_BLOCK = block
            err = (ops.band_attention(q, k, v, args.window) - ref).abs().max().item()
            rows.append((f"band_attention, block {block}", _median_ms(
                lambda: ops.band_attention(q, k, v, args.window), args.repeats), err))
    finally:
        ops.BAND_BLOCK = default
    print(f"N={args.n} H={args.heads} T={args.t} D=64 W={args.window} device={args.device} "
          f"threads={torch.get_num_threads()} torch {torch.__version__}\n")
    print("| op | median ms | max abs err vs dense mask |\n|---|---|---|")
    for name, ms, err in rows:
        print(f"| {name} | {ms:.2f} | {'' if err is None else f'{err:.1e}'} |")
    return 0
