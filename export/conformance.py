"""Conformance vectors: a small language-neutral folder that lets a client of an export prove itself without the
fixtures. `magnet export --conformance` writes it into the export as conformance/:

    conformance/index.json   format, tolerances, the cases in order, the sha256 of the graphs they were made with
    conformance/CASE.json    one greedy run: prompts, settings (manifest client.defaults keys), prompt codes, and the
                             expected codes [B][K][T] plus a trace, one entry per decoding step in order:
                             {window, stage, step, n_mask, remasked: per row the re-masked units (nonoverlap: chunk
                             indices, stride1: frames), scores: per row the span scores after the step, logits:
                             [row, frame, token, value] of the raw lm_step output}

A client passes when its codes, and each step's window/stage/step/n_mask/remasked, are equal, and its scores and
logits lie within the tolerances (|got - want| <= abs + rel·|want|). Cases: greedy nonoverlap (max and prod),
stride1, unguided (cfg 1, a null prompt), continuation from a prompt that ends mid-chunk, and a long piece (three
windows). The vectors come from the reference client (export/client.py) and are written only when its codes equal
the onnxruntime backend's (`Engine.generate`, the engine's own decoding loop) for every case.

Runners: `check` here (Python, driving export/client.py), export/node/conformance.mjs (Node, export/node/magnet.mjs).
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import read_manifest

FORMAT = "magnet-onnx-conformance"
VERSION = 1
FOLDER = "conformance"
TOLERANCE = {"scores": {"abs": 1e-4, "rel": 1e-4}, "logits": {"abs": 1e-4, "rel": 1e-5}}
PROMPTS = ["upbeat electronic dance track with a heavy bass line at 128 bpm", "slow sad piano"]

Generate = Callable[[dict[str, Any]], tuple[np.ndarray, list[dict]]]


def cases(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The cases for an export: its defaults, a few steps per stage, one segment (a long piece: 1.5 segments)."""
    c = manifest["client"]
    d, span = c["defaults"], c["span_len"]
    segment = c["limits"]["frames"][1] / c["frame_rate"]
    base = {"steps": [min(n, 4 if i == 0 else 2) for i, n in enumerate(d["steps"])], "cfg": d["cfg"],
            "temperature": d["temperature"], "anneal_temp": d["anneal_temp"], "span_arrangement": "nonoverlap",
            "span_scoring": "max", "duration": segment}
    p = 2 * span + 1 if span > 1 else 3  # ends mid-chunk: the rule for a partly fixed chunk is exercised
    return [
        {"name": "nonoverlap_max", "prompts": PROMPTS, "settings": base},
        {"name": "nonoverlap_prod", "prompts": PROMPTS, "settings": {**base, "span_scoring": "prod"}},
        {"name": "stride1", "prompts": PROMPTS, "settings": {**base, "span_arrangement": "stride1"}},
        {"name": "unguided", "prompts": [PROMPTS[1], None], "settings": {**base, "cfg": [1.0]}},
        {"name": "continuation", "prompts": PROMPTS, "settings": base, "prompt_frames": p},
        {"name": "long_piece", "prompts": PROMPTS[1:], "settings": {**base, "duration": 1.5 * segment}},
    ]


def reference_run(client: Any, case: dict[str, Any]) -> tuple[np.ndarray, list[dict]]:
    """One case through export/client.py -> (codes [B, K, T], trace)."""
    trace: list[dict] = []
    prompt = None if case.get("prompt_codes") is None else np.array(case["prompt_codes"], dtype=np.int64)
    codes = client.generate(case["prompts"], prompt_codes=prompt, trace=trace, **case["settings"])
    return codes, trace


def write(export_dir: str | Path, engine: Any) -> Path:
    """Write export_dir/conformance/ (replacing one there) and return it. `engine`: the export's onnxruntime
    backend (`export.ort.load_engine`), whose tokens every case must equal. Raises ValueError if one differs."""
    import torch

    from .client import Client

    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir, verify=False)
    client = Client(export_dir)
    out = export_dir / FOLDER
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    written = []
    for case in cases(manifest):
        if "prompt_frames" in case:  # a prompt taken from the first case's tokens
            first = json.loads((out / f"{written[0]}.json").read_text())
            case = {**case, "prompt_codes": [[row[:case["prompt_frames"]] for row in item]
                                             for item in first["expected"]["codes"]]}
        codes, trace = reference_run(client, case)
        s = case["settings"]
        prompt = None if case.get("prompt_codes") is None else torch.tensor(case["prompt_codes"])
        want = engine.generate(case["prompts"], greedy=True, steps=tuple(s["steps"]), cfg=tuple(s["cfg"]),
                               temperature=s["temperature"], anneal_temp=s["anneal_temp"],
                               span_arrangement=s["span_arrangement"], span_scoring=s["span_scoring"],
                               duration=s["duration"], prompt_codes=prompt, decode=False).codes.numpy()
        if want.shape != codes.shape or (want != codes).any():
            raise ValueError(f"conformance case {case['name']}: the reference client's tokens differ from the "
                             "engine's; no vectors written. Report this with the export's manifest")
        record = {k: v for k, v in case.items() if k != "prompt_frames"}
        record["expected"] = {"codes": codes.tolist(), "trace": trace}
        (out / f"{case['name']}.json").write_text(json.dumps(record) + "\n")
        written.append(case["name"])
    index = {"format": FORMAT, "version": VERSION, "export_format_version": manifest["format_version"],
             "greedy": True, "tolerance": TOLERANCE, "cases": written,
             "graphs": {n: g["files"][0]["sha256"] for n, g in manifest["graphs"].items()},
             "pass": "codes, and each trace step's window, stage, step, n_mask and remasked, equal; scores and "
                     "logits within tolerance: |got - want| <= abs + rel * |want|"}
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def _close(got: Any, want: Any, tol: dict[str, float]) -> bool:
    g, w = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return g.shape == w.shape and bool((np.abs(g - w) <= tol["abs"] + tol["rel"] * np.abs(w)).all())


def compare(case: dict[str, Any], codes: np.ndarray, trace: list[dict], tol: dict[str, Any]) -> list[str]:
    """-> what differs between a client's run of `case` and its expected outputs (empty: the client passes)."""
    want, name = case["expected"], case["name"]
    errors = []
    if np.asarray(codes).tolist() != want["codes"]:
        errors.append(f"{name}: codes differ")
    if len(trace) != len(want["trace"]):
        return errors + [f"{name}: {len(trace)} steps traced, {len(want['trace'])} expected"]
    for i, (g, w) in enumerate(zip(trace, want["trace"])):
        where = f"{name}: step {i} (window {w['window']}, stage {w['stage']}, step {w['step']})"
        for key in ("window", "stage", "step", "n_mask", "remasked"):
            if g[key] != w[key]:
                errors.append(f"{where}: {key} {g[key]} != {w[key]}")
        if not _close(g["scores"], w["scores"], tol["scores"]):
            errors.append(f"{where}: span scores differ beyond tolerance")
        if [x[:3] for x in g["logits"]] != [x[:3] for x in w["logits"]] or not _close(
                [x[3] for x in g["logits"]], [x[3] for x in w["logits"]], tol["logits"]):
            errors.append(f"{where}: logits {g['logits']} != {w['logits']}")
    return errors


def check(vectors: str | Path, generate: Generate) -> list[str]:
    """Run every case of a conformance folder through `generate(case) -> (codes, trace)`; -> the differences."""
    vectors = Path(vectors)
    index = json.loads((vectors / "index.json").read_text())
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{vectors} holds no {FORMAT} version {VERSION} vectors; write them with "
                         "`magnet export --conformance`")
    errors: list[str] = []
    for name in index["cases"]:
        case = json.loads((vectors / f"{name}.json").read_text())
        errors += compare(case, *generate(case), index["tolerance"])
    return errors
