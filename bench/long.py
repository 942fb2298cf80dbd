"""Long-form generation (engine.longform): `python -m magnet_engine.bench long [--what speed,seam,quality] ...`.

    speed    time to first audio (the first streamed chunk with samples) and total time of --durations pieces,
             against one plain segment, medians of --repeats runs after one warm-up
    seam     level and spectral continuity at window boundaries (where a window's new audio starts after its context)
             against points inside windows (the middle of each window's new audio): |level jump| in dB and the
             log-spectral distance (dB) between the 200 ms before and after the point, per --contexts
    quality  `bench quality`'s attributes (tempo, key, mode, instrument measured from the audio) of each 10 s slice
             of a --duration piece, against the caption; slice 0 is the plain one-segment run (window 0)

Captions are the corpus's held-out test captions (train/corpus.py), as in `bench quality`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

WHAT = ("speed", "seam", "quality")
SPAN_S = 0.2  # seconds each side of a point in the seam check
FFT = 512  # seam spectra: Hann frames of FFT samples, hop FFT // 2


def captions(n: int) -> list[dict[str, Any]]:
    from magnet_engine.train.corpus import caption_and_mentions, labels, sample_spec, split_seeds

    out = []
    for s in split_seeds("test", n):
        spec = sample_spec(s)
        text, mentions = caption_and_mentions(spec, s)
        out.append({"seed": s, "caption": text, "mentions": mentions, "labels": labels(spec)})
    return out


def speed(eng: Any, durations: list[float], repeats: int, prompt: str) -> list[dict[str, Any]]:
    """Per duration (and the plain segment): medians of first-audio and total seconds over `repeats` runs."""
    eng.generate(prompt, seed=0)  # warm-up
    rows = []
    for duration in [None, *durations]:
        first, total = [], []
        for r in range(repeats):
            t0 = time.perf_counter()
            got = None
            for chunk in eng.generate_stream(prompt, duration=duration, seed=r):
                if got is None and chunk.audio.shape[-1] > 0:
                    got = time.perf_counter() - t0
            total.append(time.perf_counter() - t0)
            first.append(got)
        seconds = duration if duration is not None else eng.config.segment_duration
        rows.append({"duration_s": seconds, "plain": duration is None, "repeats": repeats,
                     "first_audio_s": round(statistics.median(first), 3), "total_s": round(statistics.median(total), 3),
                     "first_audio_runs": [round(x, 3) for x in first], "total_runs": [round(x, 3) for x in total],
                     "realtime_factor": round(seconds / statistics.median(total), 2)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _level_db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(x**2) + 1e-12))


def _spectrum_db(x: np.ndarray) -> np.ndarray:
    frames = np.lib.stride_tricks.sliding_window_view(x, FFT)[::FFT // 2]  # [n, FFT]
    power = (np.abs(np.fft.rfft(frames * np.hanning(FFT), axis=-1)) ** 2).mean(0)
    return 10 * np.log10(power + 1e-12)


def jumps(audio: np.ndarray, point: int, span: int) -> tuple[float, float]:
    """(|level after − level before| dB, log-spectral distance dB) around sample `point`."""
    before, after = audio[point - span:point], audio[point:point + span]
    lsd = float(np.sqrt(np.mean((_spectrum_db(after) - _spectrum_db(before)) ** 2)))
    return abs(_level_db(after) - _level_db(before)), lsd


def seam(eng: Any, items: list[dict[str, Any]], duration: float, contexts: list[float]) -> list[dict[str, Any]]:
    from magnet_engine.engine import longform

    hop = eng.sample_rate // eng.config.frame_rate
    span = int(SPAN_S * eng.sample_rate)
    rows = []
    for context in contexts:
        gen = eng.request(["x"], duration=duration, context=context).gen
        windows = longform.plan(eng.config, gen)
        ends = np.cumsum([w.keep for w in windows])  # the piece's frames after each window
        starts = np.concatenate([[0], ends[:-1]])  # where each window's new audio begins
        boundaries = starts[1:]
        inside = (starts + ends) // 2
        at, within = [], []
        t0 = time.perf_counter()
        for i, item in enumerate(items):
            audio = eng.generate(item["caption"], duration=duration, context=context, seed=i).audio[0, 0].numpy()
            at += [jumps(audio, int(b) * hop, span) for b in boundaries]
            within += [jumps(audio, int(m) * hop, span) for m in inside]
        rows.append({"context_s": context, "duration_s": duration, "windows": len(windows), "n_pieces": len(items),
                     "s_per_piece": round((time.perf_counter() - t0) / len(items), 2),
                     "boundary": {"n": len(at), "level_db_median": round(float(np.median([a for a, _ in at])), 2),
                                  "lsd_db_median": round(float(np.median([b for _, b in at])), 2)},
                     "within": {"n": len(within),
                                "level_db_median": round(float(np.median([a for a, _ in within])), 2),
                                "lsd_db_median": round(float(np.median([b for _, b in within])), 2)}})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def quality(eng: Any, items: list[dict[str, Any]], duration: float, slice_s: float, context: float | None,
            classifier: Any) -> list[dict[str, Any]]:
    """Per slice: accuracy against the caption (bench quality's metrics) and agreement with slice 0's estimates
    (the same key, instrument, tempo within 4%): does the piece keep what its first window set up?"""
    from magnet_engine.train.features import tempo_correct

    from .quality import analyse, score_clip, summarise

    n = int(duration // slice_s)
    size = int(slice_s * eng.sample_rate)
    clips: list[list[dict[str, Any]]] = [[] for _ in range(n + 1)]  # n slices, then the control
    for i, item in enumerate(items):
        audio = eng.generate(item["caption"], duration=duration, context=context, seed=i).audio[0, 0]
        # control: an independent plain segment of the same caption (another seed) agrees with slice 0 only as far
        # as the caption itself pins the attributes down
        other = eng.generate(item["caption"], duration=slice_s, seed=len(items) + i).audio[0, 0]
        for j in range(n + 1):
            est = analyse(audio[j * size:(j + 1) * size] if j < n else other, eng.sample_rate, classifier)
            clips[j].append({"mentions": item["mentions"], "scores": score_clip(est, item["labels"]), "est": est})
    rows = []
    for j, c in enumerate(clips):
        same = [(a["est"]["key"] == b["est"]["key"] and a["est"]["mode"] == b["est"]["mode"],
                 a["est"]["instrument"] == b["est"]["instrument"], tempo_correct(a["est"]["tempo"],
                                                                                b["est"]["tempo"])[0])
                for a, b in zip(c, clips[0])]
        name = f"{j * slice_s:g}-{(j + 1) * slice_s:g}s" if j < n else f"independent {slice_s:g}s, other seed"
        rows.append({"slice": name, "context_s": context, "n": len(c),
                     "metrics": summarise(c),
                     "same_as_first": {name: round(float(np.mean([s[k] for s in same])), 4)
                                       for k, name in enumerate(("key", "instrument", "tempo"))}})
    for r in rows:
        print(json.dumps(r), file=sys.stderr, flush=True)
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m magnet_engine.bench long", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="MAGNeT or MusicGen model (me.load); default: the shipped one")
    p.add_argument("--what", default=",".join(WHAT), help=f"subset of {','.join(WHAT)}")
    p.add_argument("--durations", default="30,60", help="speed: piece lengths in seconds")
    p.add_argument("--repeats", type=int, default=3, help="speed: runs per duration (medians)")
    p.add_argument("--prompt", default="an upbeat jazz tune with piano and drums at 120 bpm", help="speed's prompt")
    p.add_argument("--duration", type=float, default=30.0, help="seam / quality: piece length in seconds")
    p.add_argument("--contexts", default="2.5,5,7.5", help="seam: context seconds to compare")
    p.add_argument("--n", type=int, default=8, help="seam / quality: held-out captions")
    p.add_argument("--slice", type=float, default=10.0, help="quality: seconds per scored slice")
    p.add_argument("--context", type=float, default=None, help="quality: context seconds (default: the engine's)")
    p.add_argument("--classifier", default=None, help="quality: instrument classifier file, trained and saved there "
                   "when missing (bench quality's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the report to FILE")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import magnet_engine as me

    from .common import git_sha, host, versions

    args = parser().parse_args(argv)
    what = [w.strip() for w in args.what.split(",") if w.strip()]
    if set(what) - set(WHAT) or args.repeats < 1 or args.n < 1:
        print(f"bench long: error: --what takes {','.join(WHAT)}; --repeats and --n must be >= 1", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    eng = me.load(args.model, device="cpu")
    command = "python -m magnet_engine.bench long " + " ".join(argv or sys.argv[1:])
    report: dict[str, Any] = {"command": command, "host": host(),
                              "versions": versions(), "git": git_sha(), "model": args.model or "default"}
    if "speed" in what:
        report["speed"] = speed(eng, [float(x) for x in args.durations.split(",")], args.repeats, args.prompt)
    items = captions(args.n) if {"seam", "quality"} & set(what) else []
    if "seam" in what:
        report["seam"] = seam(eng, items, args.duration, [float(x) for x in args.contexts.split(",")])
    if "quality" in what:
        from .quality import load_classifier

        clf = load_classifier(args.classifier, 300, 4.0, lambda m: print(m, file=sys.stderr))
        report["quality"] = quality(eng, items, args.duration, args.slice, args.context, clf)
    text = json.dumps(report, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0
