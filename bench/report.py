"""`python -m magnet_engine.bench report rows.jsonl [more.jsonl] [--md FILE] [--plots DIR]`: benchmark rows -> a
Markdown table, a MAGNeT-vs-AR comparison, and PNG plots of latency and throughput (samples/s) against batch size on
log axes
(the paper's latency/throughput figure, measured). When a scenario appears more than once, the last row wins.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .schema import read_rows

Row = dict[str, Any]
KIND_LABEL = {"magnet": "MAGNeT", "ar": "AR (MusicGen, ours)", "hf-musicgen": "AR (HF transformers)"}


def latest(rows: Sequence[Row]) -> list[Row]:
    """One row per scenario, the last one seen, in first-seen order."""
    by: dict[str, Row] = {}
    for r in rows:
        by[r["scenario"]] = r
    return list(by.values())


def _series_key(r: Row) -> tuple[Any, ...]:
    return (r["kind"], r["model"], r["backend"], r["device"], r["dtype"], r["duration_s"], tuple(r["steps"]))


def _label(r: Row) -> str:
    steps = f", steps {','.join(map(str, r['steps']))}" if r["kind"] == "magnet" else ""
    return f"{KIND_LABEL.get(r['kind'], r['kind'])} {r['model']} [{r['backend']}, {r['device']}, {r['dtype']}, " \
           f"{r['duration_s']:g}s{steps}]"


def _fmt(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def table(rows: Sequence[Row]) -> str:
    """All scenarios, one line each, sorted by series then batch."""
    head = ("| model | kind | backend | device | dtype | batch | audio s | passes | latency s median (p20–p80) "
            "| text s | LM s | codec s | CPU s | audio-s/s | samples/s | peak MB | warm-up s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(latest(rows), key=lambda r: (_series_key(r), r["batch"])):
        lat, st = r["latency_s"], r["stages_s"]
        lines.append(
            f"| {r['model']} | {r['kind']} | {r['backend']} | {r['device']} | {r['dtype']} | {r['batch']} "
            f"| {r['audio_s']:g} | {r['passes']} | {_fmt(lat['median'])} ({_fmt(lat['p20'])}–{_fmt(lat['p80'])}) "
            f"| {_fmt(st['text'])} | {_fmt(st['lm'])} | {_fmt(st['codec'])} | {_fmt(r['cpu_s'])} "
            f"| {_fmt(r['audio_s_per_s'])} "
            f"| {_fmt(r['samples_per_s'])} | {r['peak_mem_mb']:.0f} | "
            f"{', '.join(_fmt(w) for w in r['warmup_s']) or '–'} |")
    return "\n".join(lines)


def comparison(rows: Sequence[Row]) -> str:
    """MAGNeT over each AR kind at equal device, dtype, duration and batch, by median wall latency and by CPU seconds
    per request (ratio < 1: MAGNeT faster). CPU seconds resist load from other processes on a shared machine."""
    def where(r: Row) -> tuple[Any, ...]:
        return r["device"], r["dtype"], r["duration_s"], r["batch"]

    rows = latest(rows)
    ar_rows = {(r["kind"], where(r)): r for r in rows if r["kind"] != "magnet"}
    ars = [k for k in ("ar", "hf-musicgen") if any(key[0] == k for key in ar_rows)]
    magnets = sorted((r for r in rows if r["kind"] == "magnet"), key=lambda r: (where(r), r["passes"]))
    if not magnets or not ars:
        return ""
    head = "| device | dtype | audio s | batch | MAGNeT steps | MAGNeT s (CPU s) | " + " | ".join(
        f"{KIND_LABEL[k]} s (CPU s) | MAGNeT / {KIND_LABEL[k]}: wall, CPU" for k in ars) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for mr in magnets:
        key = where(mr)
        m, mc = mr["latency_s"]["median"], mr["cpu_s"]
        cells = []
        for k in ars:
            ar = ar_rows.get((k, key))
            if ar is not None:
                a, ac = ar["latency_s"]["median"], ar["cpu_s"]
                cells += [f"{_fmt(a)} ({_fmt(ac)})", f"{m / a:.2f}×, {mc / ac:.2f}×"]
            else:
                cells += ["–", "–"]
        steps = ",".join(str(x) for x in mr["steps"])
        lines.append(f"| {key[0]} | {key[1]} | {key[2]:g} | {key[3]} | {steps} | {_fmt(m)} ({_fmt(mc)}) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(rows: Sequence[Row]) -> str:
    parts = ["### Scenarios", "", table(rows)]
    comp = comparison(rows)
    if comp:
        parts += ["", "### MAGNeT vs AR (median latency; ratio < 1 means MAGNeT is faster)", "", comp]
    hosts = sorted({f"{r['host']['cpu']} ({r['host']['cores']} cores), GPU {r['host']['gpu'] or 'none'}; torch "
                    f"{r['versions']['torch']}, transformers {r['versions']['transformers']}; git {r['git_sha']}"
                    for r in latest(rows)})
    loads = [r["host"].get("load_avg_1m") for r in latest(rows)]
    loads = [x for x in loads if isinstance(x, (int, float))]
    parts += ["", "Machines / versions:", *[f"- {h}" for h in hosts]]
    if loads:
        parts.append(f"- 1-minute load average during the runs: {min(loads):.1f}–{max(loads):.1f}")
    return "\n".join(parts) + "\n"


def plot(rows: Sequence[Row], out_dir: str | Path) -> list[Path]:
    """Two PNGs: latency (s) and throughput (samples/s) vs batch size, one line per series, log-log axes."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    series: dict[tuple[Any, ...], list[Row]] = defaultdict(list)
    for r in latest(rows):
        series[_series_key(r)].append(r)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, ylabel, value in (
            ("latency_vs_batch.png", "latency per request, s (median; bars p20–p80)", None),
            ("throughput_vs_batch.png", "throughput, samples/s", "samples_per_s")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for rs in series.values():
            rs = sorted(rs, key=lambda r: r["batch"])
            xs = [r["batch"] for r in rs]
            style = "-o" if rs[0]["kind"] == "magnet" else "--s"
            if value is None:
                ys = [r["latency_s"]["median"] for r in rs]
                err = [[y - r["latency_s"]["p20"] for y, r in zip(ys, rs)],
                       [r["latency_s"]["p80"] - y for y, r in zip(ys, rs)]]
                ax.errorbar(xs, ys, yerr=err, fmt=style, capsize=3, label=_label(rs[0]))
            else:
                ax.plot(xs, [r[value] for r in rs], style, label=_label(rs[0]))
        ax.set_xscale("log", base=2)
        batches = sorted({r["batch"] for r in latest(rows)})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m magnet_engine.bench report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="JSON-lines files written by `python -m magnet_engine.bench e2e --json`")
    p.add_argument("--md", default=None, help="write the Markdown here (default: stdout)")
    p.add_argument("--plots", default=None, help="write latency/throughput PNGs into this folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        rows = read_rows(args.inputs)
        if not rows:
            raise ValueError(f"no rows in {', '.join(args.inputs)}")
        md = markdown(rows)
        if args.md:
            Path(args.md).write_text(md)
        else:
            sys.stdout.write(md)
        if args.plots:
            for path in plot(rows, args.plots):
                print(f"wrote {path}", file=sys.stderr)
    except (ValueError, OSError, ImportError) as e:
        print(f"bench report: error: {e}", file=sys.stderr)
        return 2
    return 0
