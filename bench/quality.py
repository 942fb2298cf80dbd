"""Text-adherence benchmark:
`python -m magnet_engine.bench quality --model DIR [--ar-model DIR] [--n 100] [--json F] [--md F]`.

Held-out captions come from the corpus's "test" split (train/corpus.py). For each condition the audio is generated
(or rendered), then tempo, key/mode and the lead instrument are measured from the audio alone (train/features.py)
and compared with what the caption asked for:

    real         the corpus clips themselves, rendered at the model's sample rate (the estimators' own accuracy)
    resynth      codec encode + decode of the real clips (the ceiling for any LM on this codec)
    magnet       MAGNeT with the model's default decoding steps
    magnet-fast  MAGNeT with fewer steps (--steps, default 4,2,2,... one value per codebook)
    ar           the autoregressive model given by --ar-model (skipped without it)
    rescore      MAGNeT (default steps) rescored by the --ar-model at the default weight (paper's lever 1)
    hybrid-Ns    Hybrid-MAGNeT: the first N s by the --ar-model, the rest by MAGNeT (--prefixes, paper's lever 2)
    continue-Ns  MAGNeT continues the codec codes of the real clip's first N s (--prefixes); scored on the rest only
    resynth-after-Ns   the codec resynthesis of that same rest: the ceiling of continue-Ns

The lever conditions run only when named in --conditions: "rescore" and "hybrid" (hybrid-Ns per prefix) need
--ar-model; "continue" (resynth-after-Ns and continue-Ns per prefix) does not. A model that follows its context
keeps the clip's tempo and key in continue-Ns whatever it does from the text alone: the pair separates coherence
(does the model keep what the audio it was given already has?) from text-following.

Each attribute is scored on the clips whose caption states it ("asked"): tempo needs the bpm number in the caption,
key/mode the key, the instrument is always named. Tempo: strict = within ±4%; octave = within ±4% of ×{1/3, 1/2,
1, 2, 3} (MIREX Accuracy1/2). Key: exact tonic+mode; mirex = weighted key score; mode alone; instrument: the corpus-
trained classifier's family. `s_per_clip` is wall-clock seconds per clip (rendering, encode+decode, or generation
in batches of --batch). The JSON report also holds every clip's caption, truth and estimates.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

CONDITIONS = ("real", "resynth", "magnet", "magnet-fast", "ar")
# opt-in conditions; "hybrid" expands to hybrid-<s>s for each of --prefixes, "continue" to resynth-after-<s>s and
# continue-<s>s
LEVERS = ("rescore", "hybrid", "continue")
NEED_AR = ("rescore", "hybrid")
METRICS = ("tempo_strict", "tempo_octave", "key", "key_mirex", "mode", "instrument")
# which caption mention each metric needs
ASKED_BY = {"tempo_strict": "tempo_bpm", "tempo_octave": "tempo_bpm", "key": "key", "key_mirex": "key",
            "mode": "key", "instrument": "instrument"}


def parse_steps(text: str | None, n_q: int) -> tuple[int, ...]:
    """'4,2,2,2' -> (4, 2, 2, 2); None -> 4 then 2 for every further codebook."""
    if text is None:
        return (4,) + (2,) * (n_q - 1)
    try:
        steps = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--steps takes comma-separated integers, got {text!r}") from None
    if len(steps) != n_q or any(s < 1 for s in steps):
        raise ValueError(f"--steps needs {n_q} positive integers (one per codebook), got {text!r}")
    return steps


def analyse(audio: torch.Tensor | np.ndarray, sr: int, classifier: Any) -> dict[str, Any]:
    """One clip [samples] -> {"tempo": bpm, "key": tonic, "mode": ..., "instrument": ...}."""
    from magnet_engine.train.features import estimate_key, estimate_tempo

    a = audio.detach().cpu().float().numpy().reshape(-1) if isinstance(audio, torch.Tensor) else np.ravel(audio)
    key, mode = estimate_key(a, sr)
    return {"tempo": round(estimate_tempo(a, sr), 2), "key": key, "mode": mode,
            "instrument": classifier.predict(a, sr)}


def score_clip(est: dict[str, Any], truth: dict[str, Any]) -> dict[str, float]:
    """Per-clip scores (0/1, or the MIREX weight) of every metric."""
    from magnet_engine.train.features import key_score, tempo_correct

    strict, octave = tempo_correct(est["tempo"], truth["tempo_bpm"])
    return {"tempo_strict": float(strict), "tempo_octave": float(octave),
            "key": float((est["key"], est["mode"]) == (truth["key"], truth["mode"])),
            "key_mirex": key_score((est["key"], est["mode"]), (truth["key"], truth["mode"])),
            "mode": float(est["mode"] == truth["mode"]), "instrument": float(est["instrument"] == truth["instrument"])}


def summarise(clips: list[dict[str, Any]]) -> dict[str, dict[str, float | int | None]]:
    """metric -> {"asked": mean over clips whose caption states the attribute, "n_asked", "all": mean over all}."""
    out: dict[str, dict[str, float | int | None]] = {}
    for m in METRICS:
        asked = [c["scores"][m] for c in clips if c["mentions"][ASKED_BY[m]]]
        every = [c["scores"][m] for c in clips]
        out[m] = {"asked": round(float(np.mean(asked)), 4) if asked else None, "n_asked": len(asked),
                  "all": round(float(np.mean(every)), 4) if every else None}
    return out


def run_condition(name: str, produce: Callable[[list[int]], tuple[torch.Tensor, int]], items: list[dict[str, Any]],
                  batch: int, classifier: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """`produce(indices)` -> (audio [b, 1, samples], sample rate) for those clips; times it, analyses every clip."""
    clips, seconds = [], 0.0
    for start in range(0, len(items), batch):
        idx = list(range(start, min(start + batch, len(items))))
        t0 = time.perf_counter()
        audio, sr = produce(idx)
        seconds += time.perf_counter() - t0
        for j, i in enumerate(idx):
            est = analyse(audio[j], sr, classifier)
            item = items[i]
            clips.append({"seed": item["seed"], "caption": item["caption"], "mentions": item["mentions"],
                          "estimate": est, "scores": score_clip(est, item["labels"])})
        log(f"  {name}: {len(clips)}/{len(items)} clips, {seconds / len(clips):.2f} s/clip")
    return {"condition": name, "n": len(clips), "s_per_clip": round(seconds / max(len(clips), 1), 4),
            "metrics": summarise(clips), "clips": clips}


def load_classifier(path: str | None, n_clips: int, duration: float, log: Callable[[str], None]) -> Any:
    """Load the instrument classifier from `path` if it exists; else train one (and save it to `path` if given)."""
    from magnet_engine.train.features import InstrumentClassifier, train_instrument_classifier

    if path and Path(path).is_file():
        return InstrumentClassifier.load(path)
    log(f"training the instrument classifier on {n_clips} clips of {duration:g} s ...")
    t0 = time.perf_counter()
    clf = train_instrument_classifier(n_clips, seed=0, duration=duration)
    log(f"  trained in {time.perf_counter() - t0:.1f} s")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        clf.save(path)
    return clf


def markdown(report: dict[str, Any]) -> str:
    """The report's summary as a Markdown table (accuracy on captions that ask for the attribute)."""
    meta = report["settings"]
    lines = [f"Text adherence on {meta['n']} held-out captions (corpus split \"{meta['split']}\"), "
             f"{meta['duration']:g} s clips, "
             f"model `{meta['model']}`" + (f", AR model `{meta['ar_model']}`" if meta.get("ar_model") else "") + ".",
             "Accuracy over the captions that state the attribute (n in the header); tempo strict ±4% / "
             "octave-tolerant ×{1/3,1/2,2,3}; key = tonic+mode exact, mirex = weighted key score.", ""]
    first = report["conditions"][0]["metrics"] if report["conditions"] else {}
    head = ["condition", *(f"{m} (n={first[m]['n_asked']})" if first else m for m in METRICS), "s/clip"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in report["conditions"]:
        vals = [c["metrics"][m]["asked"] for m in METRICS]
        cells = ["-" if v is None else f"{v:.2f}" for v in vals]
        lines.append("| " + " | ".join([c["condition"], *cells, f"{c['s_per_clip']:.2f}"]) + " |")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m magnet_engine.bench quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="MAGNeT model folder or id (me.load); default: the shipped model")
    p.add_argument("--onnx-dir", default=None, help="run the MAGNeT conditions on this `magnet export` folder "
                   "(onnxruntime, e.g. an int8 export) instead of --model")
    p.add_argument("--ar-model", default=None, help="autoregressive (MusicGen-kind) model for the 'ar' condition")
    p.add_argument("--n", type=int, default=100, help="held-out captions (default 100)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per clip (default: the model's segment, at most 10)")
    p.add_argument("--steps", default=None, help="decoding steps of 'magnet-fast', e.g. 4,2,2,2 (default 4,2,2,...)")
    p.add_argument("--batch", type=int, default=8, help="clips per generate / encode call")
    p.add_argument("--seed", type=int, default=0, help="generation seed (batch b uses seed + b)")
    p.add_argument("--conditions", default=",".join(CONDITIONS),
                   help=f"subset of {','.join(CONDITIONS + LEVERS)} (the levers need --ar-model)")
    p.add_argument("--prefixes", default="1,3", help="hybrid prefix seconds of the 'hybrid' condition")
    p.add_argument("--split", default="test", choices=("test", "valid"),
                   help="corpus split of the captions: 'test' for reports, 'valid' for tuning decoding settings")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="GenerationConfig field for the MAGNeT conditions, JSON value (e.g. temperature=1.5, "
                        "cfg=[3,1]); repeatable")
    p.add_argument("--device", default=None, help="cpu | cuda[:N] (default: cuda when available)")
    p.add_argument("--classifier", default=None,
                   help="instrument classifier .safetensors: loaded if it exists, else trained and saved there")
    p.add_argument("--classifier-clips", type=int, default=300, help="training clips when the classifier is trained")
    p.add_argument("--classifier-duration", type=float, default=4.0, help="seconds per classifier training clip")
    p.add_argument("--json", default=None, help="write the full report (with per-clip results) to FILE")
    p.add_argument("--md", default=None, help="write the summary table as Markdown to FILE")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse, run every condition, write the outputs; returns the report. Raises ValueError on bad input."""
    from magnet_engine.train.corpus import caption_and_mentions, labels, render, sample_spec, split_seeds

    import magnet_engine as me

    from .common import git_sha, host, parse_generation_sets, versions

    args = parser().parse_args(argv)
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    unknown = sorted(set(conditions) - set(CONDITIONS + LEVERS))
    if unknown:
        raise ValueError(f"unknown condition(s) {', '.join(unknown)}: choose from {', '.join(CONDITIONS + LEVERS)}")
    if set(conditions) & set(NEED_AR) and not args.ar_model:
        raise ValueError("the rescore and hybrid conditions need an AR model: pass --ar-model (e.g. default-ar)")
    try:
        prefixes = [float(x) for x in args.prefixes.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--prefixes takes comma-separated seconds, got {args.prefixes!r}") from None
    expand = {"hybrid": [f"hybrid-{p:g}s" for p in prefixes],
              "continue": [n for p in prefixes for n in (f"resynth-after-{p:g}s", f"continue-{p:g}s")]}
    conditions = [n for c in conditions for n in expand.get(c, [c])]
    if args.n < 1 or args.batch < 1:
        raise ValueError("--n and --batch must be >= 1")

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    if args.onnx_dir is not None:
        from magnet_engine.export.ort import load_engine

        eng = load_engine(args.onnx_dir, device=args.device or "cpu")
    else:
        eng = me.load(args.model, device=args.device)
    if eng.config.kind != "magnet":
        raise ValueError(f"--model must be a MAGNeT model, got a {eng.config.kind} model (pass it as --ar-model)")
    duration = args.duration if args.duration is not None else min(10.0, float(eng.config.segment_duration))
    if duration <= 0:
        raise ValueError(f"--duration must be > 0 seconds, got {duration}")
    if any(c.startswith("continue-") for c in conditions) and any(not 0 < p < duration for p in prefixes):
        raise ValueError(f"--prefixes must be between 0 and the clip's {duration:g} s for the continue condition")
    fast = parse_steps(args.steps, eng.config.n_q)
    overrides = parse_generation_sets(args.sets)
    sr = eng.sample_rate
    items = []
    for s in split_seeds(args.split, args.n):
        spec = sample_spec(s)
        text, mentions = caption_and_mentions(spec, s)
        items.append({"seed": s, "spec": spec, "caption": text, "mentions": mentions, "labels": labels(spec)})
    classifier = load_classifier(args.classifier, args.classifier_clips, args.classifier_duration, log)

    def real(idx: list[int]) -> tuple[torch.Tensor, int]:
        return torch.stack([torch.from_numpy(render(items[i]["spec"], duration, sr))[None] for i in idx]), sr

    def resynth(idx: list[int]) -> tuple[torch.Tensor, int]:
        audio, _ = real(idx)
        t0 = time.perf_counter()
        out = eng.decode(eng.encode(audio))
        resynth_seconds.append(time.perf_counter() - t0)
        return out, sr

    def generator(e: Any, dur: float, **overrides: Any) -> Callable[[list[int]], tuple[torch.Tensor, int]]:
        def produce(idx: list[int]) -> tuple[torch.Tensor, int]:
            out = e.generate([items[i]["caption"] for i in idx], seed=args.seed + idx[0] // args.batch,
                             duration=dur, **overrides)
            return out.audio, out.sample_rate
        return produce

    def after(prefix: float, continue_: bool) -> Callable[[list[int]], tuple[torch.Tensor, int]]:
        """The real clip's codes for the first `prefix` s, then MAGNeT (continue_) or the codes themselves; only the
        audio after the prefix is returned, so only that part is scored."""
        frames = round(prefix * eng.config.frame_rate)
        hop = sr // eng.config.frame_rate  # samples per frame

        def produce(idx: list[int]) -> tuple[torch.Tensor, int]:
            codes = eng.encode(real(idx)[0])  # [b, K, T]
            if not continue_:
                return eng.decode(codes)[..., frames * hop:], sr
            out = eng.generate([items[i]["caption"] for i in idx], seed=args.seed + idx[0] // args.batch,
                               duration=duration, prompt_codes=codes[..., :frames], **overrides)
            return out.audio[..., frames * hop:], sr
        return produce

    resynth_seconds: list[float] = []
    producers: dict[str, Callable[[list[int]], tuple[torch.Tensor, int]]] = {
        "real": real, "resynth": resynth, "magnet": generator(eng, duration, **overrides),
        "magnet-fast": generator(eng, duration, **{**overrides, "steps": fast})}
    for p in prefixes:
        producers[f"resynth-after-{p:g}s"], producers[f"continue-{p:g}s"] = after(p, False), after(p, True)
    if args.ar_model and any(c == "ar" or c == "rescore" or c.startswith("hybrid-") for c in conditions):
        ar = me.load(args.ar_model, device=args.device)
        if ar.config.kind != "musicgen":
            raise ValueError(f"--ar-model must be an autoregressive (musicgen) model, got {ar.config.kind}")
        producers["ar"] = generator(ar, min(duration, float(ar.config.segment_duration)))
        producers["rescore"] = generator(eng, duration, rescorer=ar, **overrides)
        for p in prefixes:
            producers[f"hybrid-{p:g}s"] = generator(eng, duration, ar_model=ar, hybrid_prefix=p, **overrides)
    elif "ar" in conditions:
        log("ar: skipped (no --ar-model)")
    results = []
    for name in conditions:
        if name not in producers:
            continue
        log(f"{name} ...")
        res = run_condition(name, producers[name], items, args.batch, classifier, log)
        if name == "resynth":  # count the codec only, not the rendering of its input
            res["s_per_clip"] = round(sum(resynth_seconds) / len(items), 4)
        results.append(res)
    report = {
        "bench": "quality",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(), "versions": versions(), "host": host(),
        "settings": {"model": str(args.model) if args.model else "default", "ar_model": args.ar_model, "n": args.n,
                     "duration": duration, "sample_rate": sr, "batch": args.batch, "seed": args.seed,
                     "default_steps": list(eng.default_generation().steps), "fast_steps": list(fast),
                     "rescore_weight": overrides.get("rescore_weight", eng.default_generation().rescore_weight),
                     "prefixes": prefixes,
                     "split": args.split, "overrides": overrides,
                     "tempo_tolerance": 0.04},
        "conditions": results,
    }
    table = markdown(report)
    print(table, end="")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.md:
        Path(args.md).write_text(table)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run(argv)
    except (ValueError, TypeError, OSError, ImportError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"bench quality: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
