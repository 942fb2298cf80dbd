"""`python -m magnet_engine.bench compile`: does `torch.compile` of the LM pass pay where the pass runs many times?

The scheduler's pass (`LM.forward_packed`, as `PackedPass` packs it) over `--requests` unguided requests of
`--duration` s each, at every codebook stage, eager and compiled (inductor, `dynamic=False`: one graph per stage and
pack layout): ms per pass (medians of interleaved rounds), the compiled call's first-call time (trace + compile, or
a load from inductor's on-disk cache) and the largest logit difference. `--requests 1 --duration 10` is the CLI's
one request. Each cache state runs in its own process on one cache folder (TORCHINDUCTOR_CACHE_DIR): `cold` (the
folder emptied first), then `warm` (what a restarted server pays). One JSON line per (cache, stage).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

TEXTS = ["upbeat electronic dance track", "slow sad piano", "calm ambient pad", "rock drums", "jazz trio",
         "lofi hip hop beat", "orchestral film score", "acoustic folk guitar"]


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m magnet_engine.bench compile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="a shipped model or a model folder")
    ap.add_argument("--requests", type=int, default=16, help="requests packed in one pass")
    ap.add_argument("--duration", type=float, default=1.0, help="seconds of audio per request")
    ap.add_argument("--passes", type=int, default=10, help="passes per timing round (3 interleaved rounds)")
    ap.add_argument("--caches", default="cold,warm", help="cache states to run, in order: cold, warm")
    ap.add_argument("--cache-dir", type=Path, default=None, help="inductor's cache folder (default: a new temp one)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--json", type=Path, default=None, help="append the JSON lines here too")
    ap.add_argument("--child", choices=("cold", "warm"), default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def median_ms(f: Callable[[Any], Any], x: Any, n: int) -> float:
    """Median ms of `n` calls f(x)."""
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f(x)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """In this process (its TORCHINDUCTOR_CACHE_DIR set by the parent): one row per stage."""
    import torch
    from magnet_engine.bench.common import git_sha, host, versions
    from magnet_engine.engine.model import Rows

    import magnet_engine as me

    if args.threads:
        torch.set_num_threads(args.threads)
    eng = me.load(args.model, device="cpu")
    lm, cfg = eng.lm, eng.config
    frames = int(round(args.duration * cfg.frame_rate))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cross = sorted((lm.cross_kv(eng.text([TEXTS[i % len(TEXTS)]])) for i in range(args.requests)),
                       key=lambda c: c[0][0].shape[2])  # PackedPass's order: equal text lengths are neighbours
    compiled = torch.compile(lm.forward_packed, dynamic=False)
    rows = []
    with torch.no_grad():
        for stage in range(cfg.n_q):
            parts = [Rows(torch.randint(0, cfg.card + 1, (1, cfg.n_q, frames), generator=g), stage, c)
                     for c in cross]
            lm.forward_packed(parts)
            t = time.perf_counter()
            got = compiled(parts)
            first = time.perf_counter() - t
            diff = max((a - b).abs().max().item() for a, b in zip(got, lm.forward_packed(parts)))
            eager, comp = [], []
            for _ in range(3):  # interleaved rounds: a shared machine's load falls on both alike
                eager.append(median_ms(lm.forward_packed, parts, args.passes))
                comp.append(median_ms(compiled, parts, args.passes))
            e, c = statistics.median(eager), statistics.median(comp)
            rows.append({"bench": "compile", "cache": args.child, "model": args.model, "requests": args.requests,
                         "frames": frames, "stage": stage, "first_call_s": round(first, 2),
                         "eager_ms": round(e, 2), "compiled_ms": round(c, 2), "speedup": round(e / c, 3),
                         "max_abs_logit_diff": diff, "threads": torch.get_num_threads(), "host": host(),
                         "versions": versions(), "git": git_sha()})
    return rows


def emit(rows: Sequence[dict[str, Any]], path: Path | None) -> None:
    for row in rows:
        line = json.dumps(row)
        print(line, flush=True)
        if path is not None:
            with path.open("a") as f:
                f.write(line + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.child is not None:
        emit(measure(args), args.json)
        return 0
    caches = [c for c in args.caches.split(",") if c]
    if not caches or any(c not in ("cold", "warm") for c in caches):
        print(f"bench compile: error: --caches takes cold and/or warm, got {args.caches!r}", file=sys.stderr)
        return 2
    folder = args.cache_dir or Path(tempfile.mkdtemp(prefix="magnet-inductor-"))
    rest = list(sys.argv[2:] if argv is None else argv)
    for cache in caches:
        if cache == "cold":
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(folder))
        cmd = [sys.executable, "-m", "magnet_engine.bench", "compile", *rest, "--child", cache]
        if subprocess.run(cmd, env=env, check=False).returncode:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
