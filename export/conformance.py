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
stride1, unguided (cfg 1, a null prompt), continuation from a prompt that ends mid-chunk, a long piece (three
windows), and two cases built for the export so that a client breaking one rule gets other *codes* (not only
another trace): `cfg_float32` (a constant cfg next to a tie of two tokens, where float64 guidance picks the other
token) and `ties` (a low temperature, whose probabilities of 1 give exactly equal span scores at the n_mask
boundary). Each case names the manifest rules it guards (`guards`); the two built ones are kept only when a client
breaking their rule (`BROKEN`) is seen to produce other codes. The vectors come from the reference client
(export/client.py) and are written only when its codes equal the onnxruntime backend's (`Engine.generate`, the
engine's own decoding loop) for every case.

Runners: `check` here (Python, driving export/client.py), export/node/conformance.mjs (Node, export/node/magnet.mjs).
"""
from __future__ import annotations

import copy
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
        {"name": "nonoverlap_max", "prompts": PROMPTS, "settings": base,
         "guards": ["spans.nonoverlap", "span_scoring max", "schedule", "rows.guided"]},
        {"name": "nonoverlap_prod", "prompts": PROMPTS, "settings": {**base, "span_scoring": "prod"},
         "guards": ["span_scoring prod"]},
        {"name": "stride1", "prompts": PROMPTS, "settings": {**base, "span_arrangement": "stride1"},
         "guards": ["spans.stride1"]},
        {"name": "unguided", "prompts": [PROMPTS[1], None], "settings": {**base, "cfg": [1.0]},
         "guards": ["rows.unguided", "rows.null_prompt"]},
        {"name": "continuation", "prompts": PROMPTS, "settings": base, "prompt_frames": p, "guards": ["continuation"]},
        {"name": "long_piece", "prompts": PROMPTS[1:], "settings": {**base, "duration": 1.5 * segment},
         "guards": ["longform"]},
    ]


# A client that breaks one rule, as the built cases must catch it through codes: the reference client with one
# method replaced. guidance: float64 arithmetic on the unrounded cfg (what JavaScript numbers give);
# rank: among exactly equal scores, the higher index first.
BROKEN: dict[str, tuple[str, Callable[..., np.ndarray]]] = {
    "decoding.guidance": ("guidance", lambda cond, uncond, coef: uncond.astype(np.float64)
                          + (cond.astype(np.float64) - uncond.astype(np.float64)) * float(coef)),
    "spans.ties": ("rank", lambda scores: scores.shape[-1] - 1
                   - np.argsort(-scores[..., ::-1], axis=-1, kind="stable")),
}


def breaking(client: Any, rule: str) -> Any:
    """A copy of the reference client (sharing its sessions) that breaks `rule` (a key of BROKEN)."""
    name, method = BROKEN[rule]
    broken = copy.copy(client)
    setattr(broken, name, method)
    return broken


def _cfg_near_ties(client: Any, prompts: list[str], frames: int, lo: float = 1.5, hi: float = 8.0) -> list[float]:
    """Constant cfg values in [lo, hi] at which float32 guidance (the rule) picks another token than float64
    guidance, however a client arranges it, at some frame of stage 0's first step (whose input, all mask, does not
    depend on cfg); the widest margins first. Next to each crossing c* of two tokens' guided logits: the c just
    inside the float32 rounding boundary on c*'s far side, so that c and float32(c) lie on either side of c*."""
    c = client.c
    b = len(prompts)
    feeds = dict(zip(client.kv_names, client.sessions["cross_kv"].run(client.kv_names,
                                                                      {"text_embeds": client.text(prompts)})))
    feeds["codes"] = np.full((2 * b, c["codebooks"], frames), c["mask_id"], dtype=np.int64)
    feeds["stage"] = np.array(0, dtype=np.int64)
    logits = client.sessions["lm_step"].run(["logits"], feeds)[0]  # [2B, T, V]
    cond, uncond = logits[:b].reshape(b * frames, -1), logits[b:].reshape(b * frames, -1)
    c64, u64 = cond.astype(np.float64), uncond.astype(np.float64)

    def float64_picks(f: int, coef: float) -> set[int]:  # exact difference, float32 difference, the other form
        return {int((u64[f] + (c64[f] - u64[f]) * coef).argmax()),
                int((u64[f] + (cond[f] - uncond[f]).astype(np.float64) * coef).argmax()),
                int((c64[f] * coef + u64[f] * (1 - coef)).argmax())}

    grid = np.linspace(lo, hi, 65)
    best = np.stack([(u64 + (c64 - u64) * g).argmax(-1) for g in grid])  # [G, B*T]
    found = []
    for gi, f in zip(*np.nonzero(best[1:] != best[:-1])):
        a, z = grid[gi], grid[gi + 1]
        top = (u64[f] + (c64[f] - u64[f]) * a).argmax()
        for _ in range(60):  # bisect to the crossing: top still wins at a, not at z
            m = (a + z) / 2
            a, z = (m, z) if (u64[f] + (c64[f] - u64[f]) * m).argmax() == top else (a, m)
        star = (a + z) / 2
        low32 = np.float32(star) if np.float32(star) <= star else np.nextafter(np.float32(star), np.float32(0))
        mid = (float(low32) + float(np.nextafter(low32, np.float32(np.inf)))) / 2  # float32 rounding boundary
        coef = float(np.nextafter(mid, star))
        rule = int(client.guidance(cond[f], uncond[f], coef).argmax())
        picks = float64_picks(f, coef)
        if len(picks) == 1 and rule not in picks:
            found.append((abs(mid - star), coef))
    return [coef for _, coef in sorted(found, reverse=True)]


def _built_cases(client: Any, manifest: dict[str, Any], base: dict[str, Any], tries: int = 8) -> list[dict]:
    """The cases built for this export (module docstring): each kept only when the client breaking its rule gives
    other codes than the reference client."""
    c = manifest["client"]
    frames = round(base["duration"] * c["frame_rate"])
    frames -= frames % c["span_len"]
    out = []
    steps = [1, *base["steps"][1:]]  # stage 0 in one step: the tokens of its only step are final
    for cfg in _cfg_near_ties(client, PROMPTS, frames)[:tries]:
        case = {"name": "cfg_float32", "prompts": PROMPTS, "settings": {**base, "steps": steps, "cfg": [cfg]},
                "guards": ["decoding.guidance"]}
        if _breaks(client, case, "decoding.guidance"):
            out.append(case)
            break
    for temperature in (0.01, 0.02, 0.05, 0.1, 0.2)[:tries]:
        case = {"name": "ties", "prompts": PROMPTS, "guards": ["spans.ties"],
                "settings": {**base, "temperature": temperature, "anneal_temp": False}}
        if _breaks(client, case, "spans.ties"):
            out.append(case)
            break
    return out


def _breaks(client: Any, case: dict[str, Any], rule: str) -> bool:
    return not np.array_equal(reference_run(client, case)[0], reference_run(breaking(client, rule), case)[0])


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
    static = cases(manifest)
    built = _built_cases(client, manifest, static[0]["settings"])
    for case in static + built:
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
             "unguarded": sorted(set(BROKEN) - {g for case in built for g in case["guards"]}),
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
