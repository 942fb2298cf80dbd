"""`python -m magnet_engine.bench load`: many requests at once, served three ways on one engine.

    sequential  one request at a time, in arrival order (`Engine.generate([prompt])`)
    static      static batching: wait for `--max-batch` requests (or `--static-wait` s after the first waits), decode
                that batch to its end, admit nobody meanwhile (same packed pass as the scheduler)
    batch       static batching as a user writes it: the same batches, each one `Engine.generate` call per run of
                equal settings (one text encoding, one LM pass of B rows, one codec call): the ceiling of batching
    scheduler   magnet_engine.Scheduler: iteration-level batching, requests join and leave at every step

`--ratio` runs `batch` and `scheduler` in turns on the same trace in one process (the scheduler on the engine the
caller loaded) and adds a row with the scheduler's throughput over the static batch's (the median of the turns'
ratios: the machine's drift between minutes falls on both alike).

Traces: `burst` (N requests submitted at once) or `poisson` (open-loop arrivals at `--rate` per second: arrival times
are drawn up front, so a slow server does not slow the arrivals). Request settings: duration uniform in
[--min-duration, --max-duration] s rounded to 0.5 s, steps drawn from `--steps-mix`, a seed each; texts from a fixed
list. One JSON line per (policy, trace) with throughput, latency and queue-wait percentiles and the histogram of
requests per LM pass.

Each policy runs in a fresh process (`--all` spawns them): a process whose threads have all run torch is slower
(engine/scheduler.py's docstring), and the scheduler's loop thread must not inherit another policy's state.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from magnet_engine.engine.cli import SPELLING

TEXTS = ["upbeat electronic dance track with a heavy bass line at 128 bpm", "slow sad piano",
         "a calm ambient pad with soft strings", "rock drums and distorted guitar", "jazz trio, walking bass, brushes",
         "lofi hip hop beat", "orchestral film score with brass", "acoustic folk guitar and whistling"]
POLICIES = ("sequential", "static", "batch", "scheduler")


@dataclass
class Request:
    arrival: float  # seconds after the trace starts
    prompt: str
    settings: dict[str, Any]
    start: float = 0.0
    finish: float = 0.0


def make_trace(args: argparse.Namespace, steps_mix: Sequence[tuple[int, ...]]) -> list[Request]:
    rng = random.Random(args.trace_seed)
    t, out = 0.0, []
    for i in range(args.requests):
        if args.trace == "poisson":
            t += rng.expovariate(args.rate)
        duration = round(rng.uniform(args.min_duration, args.max_duration) * 2) / 2
        settings: dict[str, Any] = dict(duration=duration, seed=i)
        if steps_mix:
            settings["steps"] = rng.choice(steps_mix)
        out.append(Request(t, TEXTS[i % len(TEXTS)], settings))
    return out


def wait_until(t0: float, t: float) -> None:
    delay = t0 + t - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def run_sequential(eng: Any, trace: list[Request]) -> collections.Counter[int]:
    t0 = time.perf_counter()
    passes = 0
    for req in trace:  # arrivals are open-loop: a request waits if it arrived while another was decoding
        wait_until(t0, req.arrival)
        req.start = time.perf_counter() - t0
        eng.generate([req.prompt], **req.settings)
        req.finish = time.perf_counter() - t0
        passes += sum(eng.request([req.prompt], **req.settings).gen.steps)
    return collections.Counter({1: passes})


def run_static(eng: Any, trace: list[Request], max_batch: int, wait: float) -> collections.Counter[int]:
    hist: collections.Counter[int] = collections.Counter()
    t0 = time.perf_counter()
    for batch in batches(trace, max_batch, wait, t0):
        decs = eng.start_many([eng.request([r.prompt], **r.settings) for r in batch])
        for step in range(max(d.total for d in decs)):  # requests in each pass (those with steps left)
            hist[sum(d.total > step for d in decs)] += 1
        for r, codes in zip(batch, eng.decode_together(decs)):  # to the end of the longest (one program)
            eng.decode(codes)
            r.finish = time.perf_counter() - t0
    return hist


def batches(trace: list[Request], max_batch: int, wait: float, t0: float) -> Iterator[list[Request]]:
    """The static batches of a trace as they close (full, or `wait` s after their first request arrived), waiting
    for their arrivals in real time; each request's start is set when its batch closes."""
    pending = list(trace)
    while pending:
        first = pending[0].arrival
        wait_until(t0, first)
        now = time.perf_counter() - t0
        full_at = pending[min(max_batch, len(pending)) - 1].arrival
        wait_until(t0, max(now, min(full_at, first + wait)))
        now = time.perf_counter() - t0
        batch = [r for r in pending[:max_batch] if r.arrival <= now]
        pending = pending[len(batch):]
        for r in batch:
            r.start = time.perf_counter() - t0
        yield batch


def run_batch(eng: Any, trace: list[Request], max_batch: int, wait: float) -> collections.Counter[int]:
    """Static batches, each run of neighbours with equal settings (the seed aside) in one `Engine.generate` call: row
    b of a call draws from seed + b (magnet.row_generators), so consecutive seeds give each request its own noise."""
    hist: collections.Counter[int] = collections.Counter()
    t0 = time.perf_counter()
    for batch in batches(trace, max_batch, wait, t0):
        calls: list[list[Request]] = []
        for r in batch:
            same = calls and {**calls[-1][0].settings, "seed": 0} == {**r.settings, "seed": 0}
            if same and r.settings["seed"] == calls[-1][-1].settings["seed"] + 1:
                calls[-1].append(r)
            else:
                calls.append([r])
        for call in calls:
            eng.generate([r.prompt for r in call], **call[0].settings)
            hist[len(call)] += sum(eng.request([call[0].prompt], **call[0].settings).gen.steps)
            for r in call:
                r.finish = time.perf_counter() - t0
    return hist


def run_scheduler(eng: Any, traces: list[list[Request]], max_batch: int, warm: list[Request],
                  max_frames: int | None) -> tuple[list[collections.Counter[int]], Any]:
    """`eng`: an Engine, or a loader that the scheduler's loop thread calls (all torch work in that thread). The
    warm-up requests run through the same scheduler (a second loop thread would not be the one that loaded)."""
    with open_scheduler(eng, max_batch, max(len(warm), *map(len, traces)), max_frames) as sched:
        run_trace(sched, warm)
        hists = [run_trace(sched, trace) for trace in traces]
    return hists, sched.engine


def open_scheduler(eng: Any, max_batch: int, queue: int, max_frames: int | None) -> Any:
    from magnet_engine.engine.scheduler import Scheduler

    return Scheduler(eng, max_batch=max_batch, max_queue=queue, max_frames=max_frames)


def run_trace(sched: Any, trace: list[Request]) -> collections.Counter[int]:
    """One trace through a running, idle scheduler: submitted at its arrival times, each request's start and finish
    from its stats -> the histogram of requests per LM pass."""
    sched.batch_sizes.clear()  # the loop is idle: nothing is active
    t0 = time.perf_counter()
    futures = []
    for req in trace:
        wait_until(t0, req.arrival)
        futures.append(sched.submit(req.prompt, **req.settings))
    for req, f in zip(trace, futures):
        stats = f.result().stats
        req.finish = req.arrival + stats["latency_s"]
        req.start = req.arrival + stats["queue_s"]
    return collections.Counter(sched.batch_sizes)


def percentiles(xs: Sequence[float]) -> dict[str, float]:
    from magnet_engine.bench.common import percentile

    return {f"p{q}": round(percentile(xs, q), 4) for q in (50, 95, 99)}


def run_one(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    def load() -> Any:  # a shipped model, a checkpoint or export folder, or a preset's shape with random weights
        from magnet_engine.bench.presets import build

        eng = build(args.model, args.kind, torch.device(args.device), args.dtype, backend=args.backend).engine
        return eng.set_deterministic(args.deterministic).set_graph(args.cuda_graph)

    in_loop = args.policy == "scheduler" and args.scheduler_load == "loop" and not args.ratio
    eng = load if in_loop else load()  # the scheduler's loop thread loads it: in its thread
    if args.ratio:
        return run_ratio(args, eng)
    return run_policy(args, args.policy, eng)


def parse_steps_mix(args: argparse.Namespace) -> list[tuple[int, ...]]:
    return [tuple(int(x) for x in s.split(",")) for s in args.steps_mix or []]


def warm_up(args: argparse.Namespace) -> list[Request]:
    """Requests outside the trace that warm a policy up (allocator, text encoder, kernels), through that policy: two
    full batches, since a deterministic codec probes a batch shape at its second sight (`Encodec.decode_rows`)."""
    return [Request(0.0, "warm up", dict(duration=1.0, seed=i)) for i in range(2 * args.max_batch)]


def run_policy(args: argparse.Namespace, policy: str, eng: Any) -> list[dict[str, Any]]:
    """One policy over `--repeats` copies of the trace after its warm-up -> one row per repeat."""
    warm, steps_mix = warm_up(args), parse_steps_mix(args)
    traces = [make_trace(args, steps_mix) for _ in range(args.repeats)]
    if policy == "sequential":
        run_sequential(eng, warm[:2])
        hists = [run_sequential(eng, tr) for tr in traces]
    elif policy == "static":
        run_static(eng, warm, args.max_batch, 0.0)
        hists = [run_static(eng, tr, args.max_batch, args.static_wait) for tr in traces]
    elif policy == "batch":
        run_batch(eng, warm, args.max_batch, 0.0)
        hists = [run_batch(eng, tr, args.max_batch, args.static_wait) for tr in traces]
    else:
        hists, eng = run_scheduler(eng, traces, args.max_batch, warm, args.max_frames)
    return [summarize(args, tr, hist, i, eng, policy) for i, (tr, hist) in enumerate(zip(traces, hists))]


def run_ratio(args: argparse.Namespace, eng: Any) -> list[dict[str, Any]]:
    """`--ratio`: the static batch (`batch`) and the scheduler on the same trace, in this process, on one engine loaded
    here, in turns (static, scheduler, static, ...), so that the machine's drift between minutes falls on both alike.
    The static batch runs in this thread while the scheduler idles (its loop thread has handed its OpenMP workers
    back), and this thread hands its own back before each scheduler turn (engine.scheduler: two threads' pools
    throttle each other) -> their rows and a `load-ratio` row: the median of the turns' throughput ratios."""
    from magnet_engine.engine.scheduler import release_openmp_threads

    warm, steps_mix = warm_up(args), parse_steps_mix(args)
    turns = [(make_trace(args, steps_mix), make_trace(args, steps_mix)) for _ in range(args.repeats)]
    run_batch(eng, warm, args.max_batch, 0.0)
    static_hists, sched_hists = [], []
    with open_scheduler(eng, args.max_batch, max(len(warm), args.requests), args.max_frames) as sched:
        run_trace(sched, warm)
        for static_trace, sched_trace in turns:
            static_hists.append(run_batch(eng, static_trace, args.max_batch, args.static_wait))
            release_openmp_threads()
            sched_hists.append(run_trace(sched, sched_trace))
    static = [summarize(args, tr, h, i, eng, "batch") for i, ((tr, _), h) in enumerate(zip(turns, static_hists))]
    sched_rows = [summarize(args, tr, h, i, eng, "scheduler")
                  for i, ((_, tr), h) in enumerate(zip(turns, sched_hists))]
    return [*static, *sched_rows, ratio_row(static, sched_rows)]


def ratio_row(static: Sequence[dict[str, Any]], sched: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The scheduler's throughput over the static batch's: the median of the turns' ratios (each pair ran back to
    back on the same trace), and the ratio of the two medians."""
    import statistics

    pairs = [b["throughput_rps"] / a["throughput_rps"] for a, b in zip(static, sched)]
    a = statistics.median(r["throughput_rps"] for r in static)
    b = statistics.median(r["throughput_rps"] for r in sched)
    first = static[0]
    keep = ("trace", "rate", "requests", "max_batch", "durations_s", "steps_mix", "model", "backend", "device",
            "dtype", "deterministic", "host", "versions", "git")
    return {"bench": "load-ratio", "ratio": "scheduler/batch", "value": round(statistics.median(pairs), 3),
            "turn_ratios": [round(x, 3) for x in pairs], "ratio_of_medians": round(b / a, 3),
            "batch_throughput_rps": [r["throughput_rps"] for r in static],
            "scheduler_throughput_rps": [r["throughput_rps"] for r in sched],
            **{k: first[k] for k in keep}}


def graph_counts(eng: Any) -> dict[str, Any]:
    """What CUDA graphs cost and served over the whole run, warm-up included: whole programs (sequential, static)
    and the scheduler's passes (GraphedPass)."""
    if not eng.graph:
        return {}
    out = {"program_captures": eng.programs.captures, "program_capture_s": round(eng.programs.capture_s, 3),
           "capture_failures": eng.capture_failures()}
    passes = getattr(eng.lm_pass, "passes", None)
    if passes is not None:
        out.update(pass_captures=eng.lm_pass.graphs.captures, pass_capture_s=round(eng.lm_pass.graphs.capture_s, 3),
                   passes_graphed=passes["graph"], passes_eager=passes["eager"])
    return out


def summarize(args: argparse.Namespace, trace: list[Request], hist: collections.Counter[int], repeat: int,
              eng: Any, policy: str) -> dict[str, Any]:
    from magnet_engine.bench.common import git_sha, host, versions

    first, last = min(r.arrival for r in trace), max(r.finish for r in trace)
    latency = [r.finish - r.arrival for r in trace]
    wait = [r.start - r.arrival for r in trace]
    audio = sum(r.settings["duration"] for r in trace)
    return {"bench": "load", "policy": policy, "trace": args.trace, "repeat": repeat,
            "loaded_in": "caller" if args.ratio else args.scheduler_load if policy == "scheduler" else "main thread",
            "rate": args.rate if args.trace == "poisson" else None, "requests": len(trace),
            "max_batch": None if policy == "sequential" else args.max_batch,
            "max_frames": args.max_frames if policy == "scheduler" else None,
            "durations_s": [args.min_duration, args.max_duration], "steps_mix": args.steps_mix,
            "makespan_s": round(last - first, 3), "throughput_rps": round(len(trace) / (last - first), 3),
            "audio_s_per_s": round(audio / (last - first), 3), "latency_s": percentiles(latency),
            "queue_wait_s": percentiles(wait), "batch_hist": dict(sorted(hist.items())),
            "model": args.model, "backend": args.backend or "torch", "device": args.device, "dtype": args.dtype,
            "deterministic": args.deterministic,
            "cuda_graph": args.cuda_graph, **graph_counts(eng), "host": host(), "versions": versions(),
            "git": git_sha()}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m magnet_engine.bench load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", choices=POLICIES, default="scheduler")
    ap.add_argument("--all", action="store_true", help="run every policy, each in a fresh process")
    ap.add_argument("--ratio", action="store_true",
                    help="run `batch` and `scheduler` on the same trace in this process and add a row with the "
                         "scheduler's throughput over the static batch's")
    ap.add_argument("--trace", choices=("burst", "poisson"), default="burst")
    ap.add_argument("--rate", type=float, default=2.0, help="poisson arrivals per second")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--min-duration", type=float, default=1.0)
    ap.add_argument("--max-duration", type=float, default=1.0)
    ap.add_argument("--steps-mix", nargs="+", default=None,
                    help="steps lists each request draws from, e.g. 1,4,4,4 2,6,6,6 (default: the model's own)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-frames", type=int, default=None, help="scheduler: LM-pass frame budget (rows x T)")
    ap.add_argument("--static-wait", type=float, default=0.25, help="static batching: seconds a batch waits to fill")
    ap.add_argument("--trace-seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="runs of the trace after the warm-up (one JSON line each)")
    ap.add_argument("--scheduler-load", choices=("loop", "caller"), default="loop",
                    help="scheduler: the loop thread loads the model (a loader) or the caller passes a loaded engine")
    ap.add_argument("--model", default="default",
                    help="a shipped model, a model folder, or a bench preset (random weights: magnet-small-10secs)")
    ap.add_argument("--kind", choices=("magnet", "ar"), default=None, help="for a preset that serves both (tiny)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default=None, help="torch | triton (default: torch; triton: its kernels, and on "
                    "CUDA its row-invariant GEMM for --deterministic)")
    ap.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: the device's)")
    ap.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                    help="row-invariant linears (Engine.set_deterministic; default: the device's, as me.load)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="CUDA graphs (Engine.set_graph): sequential replays each request's program, static each "
                         "batch's, the scheduler its LM pass per layout")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument(*SPELLING["output"], dest="out", type=Path, default=None, help="append the JSON lines here too")
    ap.add_argument("--plot", nargs=2, type=Path, metavar=("ROWS", "PNG"), default=None,
                    help="run nothing: plot the load rows of ROWS (JSON lines) into PNG")
    args = ap.parse_args(argv)
    if args.deterministic is None:
        from magnet_engine.engine.config import deterministic_by_default

        args.deterministic = deterministic_by_default(args.device.split(":")[0])
    return args


def _label(r: dict[str, Any]) -> str:
    label = {"sequential": "one at a time"}.get(r["policy"], r["policy"])
    if r["policy"] != "sequential":
        label += f" b{r['max_batch']}"
    if r.get("max_frames"):
        label += f" f{r['max_frames']}"
    return label if r.get("loaded_in") != "caller" else label + " (caller-loaded)"


def plot(rows: Sequence[dict[str, Any]], png: Path) -> Path:
    """One PNG: Poisson traces (p50 and p95 latency, throughput vs arrival rate, a line per policy) and the burst
    trace (throughput per policy, the median over repeats)."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    Rows = list[dict[str, Any]]
    poisson: dict[str, dict[float, Rows]] = collections.defaultdict(lambda: collections.defaultdict(list))
    burst: dict[str, list[float]] = collections.defaultdict(list)
    for r in rows:
        if r.get("bench") != "load":
            continue
        if r["trace"] == "poisson":
            poisson[_label(r)][r["rate"]].append(r)
        else:
            burst[_label(r)].append(r["throughput_rps"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for label, by_rate in poisson.items():
        rates = sorted(by_rate)
        color = None  # one colour per policy: p95 solid, p50 dotted
        for key, style in (("p95", "-o"), ("p50", ":x")):
            (line,) = axes[0].plot(rates, [statistics.median(r["latency_s"][key] for r in by_rate[x]) for x in rates],
                                   style, color=color, label=f"{label} {key}")
            color = line.get_color()
        axes[1].plot(rates, [statistics.median(r["throughput_rps"] for r in by_rate[x]) for x in rates], "-o",
                     label=label)
    axes[0].set(xlabel="arrivals per second (Poisson)", ylabel="latency, s", title="latency p50 (dotted) / p95")
    axes[1].set(xlabel="arrivals per second (Poisson)", ylabel="requests per second", title="throughput")
    names = list(burst)
    axes[2].bar(range(len(names)), [statistics.median(burst[n]) for n in names])
    axes[2].set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    axes[2].set(ylabel="requests per second", title="burst: all requests at once (median of repeats)")
    for ax in axes[:2]:
        ax.grid(True, alpha=0.3)
        if poisson:
            ax.legend(fontsize=6)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.plot is not None:
        rows_file, png = args.plot
        if not rows_file.is_file():
            print(f"bench load: error: {rows_file} does not exist: give the JSON lines `--out` wrote", file=sys.stderr)
            return 2
        print(plot([json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()], png))
        return 0
    if args.all:
        rest = [a for a in (sys.argv[2:] if argv is None else argv) if a != "--all"]
        for policy in POLICIES:  # the last --policy wins
            cmd = [sys.executable, "-m", "magnet_engine.bench", "load", *rest, "--policy", policy]
            if subprocess.run(cmd, check=False).returncode:
                return 1
        return 0
    from magnet_engine.bench.common import report_capture_failures

    failed = []
    for row in run_one(args):
        line = json.dumps(row)
        print(line, flush=True)
        if args.out is not None:
            with args.out.open("a") as f:
                f.write(line + "\n")
        failed += row.get("capture_failures", [])
        if row["bench"] == "load-ratio":
            print(f"bench load: scheduler / static batch throughput = {row['value']}", file=sys.stderr)
    return report_capture_failures("load", failed)


if __name__ == "__main__":
    sys.exit(main())
