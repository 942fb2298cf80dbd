"""Conformance vectors: a small language-neutral folder that lets a client of an export prove itself without the
fixtures. `magnet export --conformance` writes it into the export as conformance/:

    conformance/index.json   format, tolerances, the cases in order, the sampled ones, their margin, the sha256 of
                             the graphs they were made with
    conformance/CASE.json    one run: prompts, settings (manifest client.defaults keys; `greedy` always stated),
                             prompt codes, for a sampled case the uniforms [S][B][T] (one [B][T] per decoding step
                             in order: the u of position (b, t) in decoding.sampling, drawn by the engine), and the
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
boundary). Two sampled cases, `sampled_top_p` (top_p 0.5) and `sampled_top_k` (top_k 3), two prompts, 4 spans,
5 steps at temperature 1, carry the uniforms their draws read (`uniforms`; index.json lists them as `sampled`), so a
client samples with them instead of its own generator and must give the expected codes exactly. Their draws are
robust to arithmetic: each target u·total lies at least `MARGIN`·total from every step of the cumulative weights,
and the same token is drawn whether the tokens whose nucleus mass lies within `MARGIN` of top_p are kept or cut
(index.json `margin`). Each case names the manifest rules it guards (`guards`); the built and the sampled ones are
kept only when a client breaking their rules (`BROKEN`) is seen to produce other codes. The vectors come from the
reference client (export/client.py) and are written only when its codes equal the onnxruntime backend's
(`Engine.generate`, the engine's own decoding loop; a sampled case with the seed whose noise its uniforms are) for
every case.

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
VERSION = 2  # 2: sampled cases (uniforms), `greedy` in every case's settings
FOLDER = "conformance"
TOLERANCE = {"scores": {"abs": 1e-4, "rel": 1e-4}, "logits": {"abs": 1e-4, "rel": 1e-5}}
MARGIN = 5e-4  # a sampled case's least distance of a draw from a cdf step (x total), of a nucleus mass from top_p
PROMPTS = ["upbeat electronic dance track with a heavy bass line at 128 bpm", "slow sad piano"]

Generate = Callable[[dict[str, Any]], tuple[np.ndarray, list[dict]]]


def cases(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The cases for an export: its defaults, a few steps per stage, one segment (a long piece: 1.5 segments)."""
    c = manifest["client"]
    d, span = c["defaults"], c["span_len"]
    segment = c["limits"]["frames"][1] / c["frame_rate"]
    base = {"steps": [min(n, 4 if i == 0 else 2) for i, n in enumerate(d["steps"])], "cfg": d["cfg"],
            "temperature": d["temperature"], "anneal_temp": d["anneal_temp"], "span_arrangement": "nonoverlap",
            "span_scoring": "max", "duration": segment, "greedy": True}
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


# A client that breaks one rule, as the built and sampled cases must catch it through codes: the reference client
# with one method replaced. guidance: float64 arithmetic on the unrounded cfg (what JavaScript numbers give);
# rank: among exactly equal scores, the higher index first; uniforms: its own noise, not the case's; draw: the most
# probable kept token (greedy); top_p, top_k: every token kept.
BROKEN: dict[str, tuple[str, Callable[..., np.ndarray]]] = {
    "decoding.guidance": ("guidance", lambda cond, uncond, coef: uncond.astype(np.float64)
                          + (cond.astype(np.float64) - uncond.astype(np.float64)) * float(coef)),
    "spans.ties": ("rank", lambda scores: scores.shape[-1] - 1
                   - np.argsort(-scores[..., ::-1], axis=-1, kind="stable")),
    "decoding.sampling uniforms": ("draw", lambda weights, u: _draw(weights, np.random.default_rng(0).random(u.shape))),
    "decoding.sampling draw": ("draw", lambda weights, u: weights.argmax(-1)),
    "decoding.sampling top_p": ("nucleus", lambda probs, top_p: np.ones(probs.shape, dtype=bool)),
    "decoding.sampling top_k": ("top_k_keep", lambda probs, k: np.ones(probs.shape, dtype=bool)),
}
# The sampled cases: (name, its top_p and top_k, the rules it guards)
SAMPLED = [("sampled_top_p", {"top_p": 0.5, "top_k": 0}, ["decoding.sampling top_p"]),
           ("sampled_top_k", {"top_p": 0.0, "top_k": 3}, ["decoding.sampling top_k"])]


def _draw(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    from .client import Client

    return Client.draw(weights, u)


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


def _sampled_cases(client: Any, manifest: dict[str, Any], base: dict[str, Any], tries: int = 16) -> list[dict]:
    """The sampled cases (module docstring), each with the uniforms the engine draws for the first seed whose draws
    keep MARGIN and at which every rule it guards, broken, gives other codes."""
    import torch
    from magnet_engine.engine.magnet import draw_noise, row_generators

    c = manifest["client"]
    frames = 4 * c["span_len"]
    steps = [2] + [1] * (len(base["steps"]) - 1)
    settings = {**base, "steps": steps, "duration": frames / c["frame_rate"], "greedy": False, "temperature": 1.0,
                "anneal_temp": False}
    cpu = torch.device("cpu")
    out = []
    for name, keep, guards in SAMPLED:
        guards = ["decoding.sampling uniforms", "decoding.sampling draw", *guards]
        for seed in range(tries):
            noise = draw_noise(sum(steps), len(PROMPTS), frames, cpu, row_generators(seed, len(PROMPTS), cpu))
            case = {"name": name, "prompts": PROMPTS, "settings": {**settings, **keep}, "seed": seed,
                    "uniforms": noise.tolist(), "guards": guards}
            if _margin(client, case) > MARGIN and all(_breaks(client, case, rule) for rule in guards):
                out.append(case)
                break
    return out


def _margin(client: Any, case: dict[str, Any]) -> float:
    """The least distance, in a reference run of `case`, of a draw's target u·total from a step of the cumulative
    weights (x total); 0 where the tokens whose nucleus mass (their sorted exclusive cumsum) lies within MARGIN of
    top_p, kept or cut, change a draw (a client's arithmetic may put them on either side)."""
    least = [1.0]
    near: list[tuple[np.ndarray, np.ndarray]] = []  # the last nucleus call's probs and tokens at its cut

    def nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
        ordered = -np.sort(-probs, axis=-1)
        exclusive = np.cumsum(ordered.astype(np.float64), axis=-1) - ordered
        at_cut = np.abs(exclusive - top_p) <= MARGIN  # [.., V] in sorted order
        lo = np.where(at_cut, ordered, np.inf).min(-1, keepdims=True)
        hi = np.where(at_cut, ordered, -np.inf).max(-1, keepdims=True)
        near.append((probs, (probs >= lo) & (probs <= hi)))
        return client.nucleus(probs, top_p)

    def draw(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
        tokens = client.draw(weights, u)
        variants = [weights]
        if near:
            probs, ambiguous = near.pop()
            variants += [np.where(ambiguous, probs, weights), np.where(ambiguous, 0, weights)]
        for w in variants:
            same = np.array_equal(client.draw(w, u), tokens)
            least.append(_draw_margin(w, u, tokens) if same else 0.0)
        return tokens

    watched = copy.copy(client)
    watched.draw, watched.nucleus = draw, nucleus
    reference_run(watched, case)
    return min(least)


def _draw_margin(weights: np.ndarray, u: np.ndarray, tokens: np.ndarray) -> float:
    """weights [.., V], u [..], the drawn tokens [..] -> the least of min(target - lower step, upper step - target)
    / total, where the token's step of the cumulative weights spans (lower, upper] and target = u·total."""
    cdf = np.cumsum(weights.astype(np.float64), axis=-1)
    total = cdf[..., -1]
    upper = np.take_along_axis(cdf, tokens[..., None], -1)[..., 0]
    lower = np.where(tokens > 0, np.take_along_axis(cdf, np.maximum(tokens - 1, 0)[..., None], -1)[..., 0], 0.0)
    target = u * total
    return float((np.minimum(target - lower, upper - target) / total).min())


def _breaks(client: Any, case: dict[str, Any], rule: str) -> bool:
    return not np.array_equal(reference_run(client, case)[0], reference_run(breaking(client, rule), case)[0])


def reference_run(client: Any, case: dict[str, Any]) -> tuple[np.ndarray, list[dict]]:
    """One case through export/client.py -> (codes [B, K, T], trace)."""
    trace: list[dict] = []
    prompt = None if case.get("prompt_codes") is None else np.array(case["prompt_codes"], dtype=np.int64)
    codes = client.generate(case["prompts"], prompt_codes=prompt, uniforms=case.get("uniforms"), trace=trace,
                            **case["settings"])
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
    built = _built_cases(client, manifest, static[0]["settings"]) + _sampled_cases(client, manifest,
                                                                                  static[0]["settings"])
    for case in static + built:
        if "prompt_frames" in case:  # a prompt taken from the first case's tokens
            first = json.loads((out / f"{written[0]}.json").read_text())
            case = {**case, "prompt_codes": [[row[:case["prompt_frames"]] for row in item]
                                             for item in first["expected"]["codes"]]}
        codes, trace = reference_run(client, case)
        s = case["settings"]
        prompt = None if case.get("prompt_codes") is None else torch.tensor(case["prompt_codes"])
        want = engine.generate(case["prompts"], greedy=s["greedy"], steps=tuple(s["steps"]), cfg=tuple(s["cfg"]),
                               temperature=s["temperature"], anneal_temp=s["anneal_temp"],
                               top_k=s.get("top_k", 0), top_p=s.get("top_p", 0.0), seed=case.get("seed"),
                               span_arrangement=s["span_arrangement"], span_scoring=s["span_scoring"],
                               duration=s["duration"], prompt_codes=prompt, decode=False).codes.numpy()
        if want.shape != codes.shape or (want != codes).any():
            raise ValueError(f"conformance case {case['name']}: the reference client's tokens differ from the "
                             "engine's; no vectors written. Report this with the export's manifest")
        record = {k: v for k, v in case.items() if k not in ("prompt_frames", "seed")}  # the uniforms are the noise
        record["expected"] = {"codes": codes.tolist(), "trace": trace}
        (out / f"{case['name']}.json").write_text(json.dumps(record) + "\n")
        written.append(case["name"])
    index = {"format": FORMAT, "version": VERSION, "export_format_version": manifest["format_version"],
             "sampled": [case["name"] for case in built if "uniforms" in case], "margin": MARGIN,
             "tolerance": TOLERANCE, "cases": written,
             "unguarded": sorted(set(BROKEN) - {g for case in built for g in case["guards"]}),
             "graphs": {n: g["files"][0]["sha256"] for n, g in manifest["graphs"].items()},
             "pass": "codes, and each trace step's window, stage, step, n_mask and remasked, equal; scores and "
                     "logits within tolerance: |got - want| <= abs + rel * |want|; a sampled case decoded with its "
                     "uniforms, one [B][T] per step in order, in place of the client's own noise"}
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
