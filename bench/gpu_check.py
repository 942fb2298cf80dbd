"""The checks behind bench/gpu.sh: each prints one JSON line per case and exits 1 when a case fails.

    python -m magnet_engine.bench.gpu_check kernels [--device cuda] [--quick] [--json FILE]
    python -m magnet_engine.bench.gpu_check fixture --fixture DIR [--device cuda] [--backend torch] [--dtype float32]
                                            [--runs gen_nonoverlap_max,...] [--json FILE] [--tokens FILE.npz]
    python -m magnet_engine.bench.gpu_check dist-info DIR

kernels: the Triton kernels against their PyTorch references on the device, with tests/test_kernels.py's criteria
(attention error <= 2x PyTorch's own same-dtype error + 1e-3; sampling picks the very same tokens given the same
noise, probabilities within 1e-5 relative; the row-invariant GEMM within 2x PyTorch's error and bit-equal rows in
any batch), at the released models' shapes; on CUDA it also times the band kernel
against SDPA with a dense band mask. `--quick` (or a CPU device): tiny shapes through Triton's interpreter.

fixture: the reference fixture's greedy runs through the `magnet generate` CLI (a subprocess, as a user runs it) on
a device, backend and dtype; the tokens must equal expected_magnet.npz. They are saved to `--tokens` (one array per
backend-dtype-run) so that a reader can compare them itself; the audio's distance to the reference decode is
reported, not judged (cuDNN may convolve in TF32).

dist-info: a `magnet_engine-VERSION.dist-info` with setup.py's entry points in DIR, so that a checkout that is only on
PYTHONPATH (not installed) finds its backends and subcommands through importlib.metadata.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parent.parent
FIXTURE_RUNS = ("gen_nonoverlap_max", "gen_nonoverlap_prod", "gen_stride1", "gen_cfg3_temp1", "gen_continuation")


def _emit(row: dict[str, Any], out: TextIO | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out is not None:
        out.write(line + "\n")
        out.flush()


# ------------------------------------------------------------------------------------------------------- kernels


def check_kernels(device: str, quick: bool, out: TextIO | None) -> int:
    """-> the number of failed checks. Triton's interpreter on CPU: TRITON_INTERPRET must be set before triton's
    first import, which main() does."""
    import magnet_engine.kernels.attention as kattn
    import magnet_engine.kernels.sampling as ksamp
    import torch
    from magnet_engine.engine.sampling import StepSampling

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def qkv(n: int, h: int, tq: int, tk: int, d: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(n, h, t, d, generator=g).to(dtype).to(device) for t in (tq, tk, tk))

    fails = 0

    def attention(case: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> None:
        nonlocal fails
        got = kattn.attention(q, k, v, window)
        sync()
        ref32 = kattn.attention_ref(q.float(), k.float(), v.float(), window)
        same = kattn.attention_ref(q, k, v, window).float()
        err = (got.float() - ref32).abs().max().item()
        torch_err = (same - ref32).abs().max().item()
        ok = bool(torch.isfinite(got).all()) and got.dtype == q.dtype and err <= 2 * torch_err + 1e-3
        fails += not ok
        _emit({"check": "attention", "case": case, "ok": ok, "err": err, "torch_err": torch_err}, out)

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        dn = str(dtype).removeprefix("torch.")
        for t in (7,) if quick else (7, 498, 500, 1500):
            for window in (None, 5, 0, 1):
                n, h = (3, 2) if t == 7 else (2, 16)
                attention(f"self T={t} w={window} {dn}", *qkv(n, h, t, t, 64, dtype, t + (window or -1)), window)
        for tk in (1, 13, 40):
            attention(f"cross Tk={tk} {dn}", *qkv(2, 2 if quick else 16, 20 if quick else 500, tk, 64, dtype, tk),
                      None)
        for d in () if quick else (16, 32, 128):
            attention(f"headdim {d} {dn}", *qkv(2, 2, 70, 70, d, dtype, d), 3)

    modes = {
        "greedy": StepSampling(cfg_coef=3.0, temperature=1.0, top_k=0, top_p=0.0, greedy=True),
        "multinomial": StepSampling(cfg_coef=3.0, temperature=0.7, top_k=0, top_p=0.0, greedy=False),
        "top_k5": StepSampling(cfg_coef=3.0, temperature=1.0, top_k=5, top_p=0.0, greedy=False),
        "top_p0.9": StepSampling(cfg_coef=3.0, temperature=2.0, top_k=250, top_p=0.9, greedy=False),
        "top_p1": StepSampling(cfg_coef=3.0, temperature=1.0, top_k=0, top_p=1.0, greedy=False),
    }
    b, t = (2, 20) if quick else (4, 500)
    for vocab in (37,) if quick else (37, 2048):
        for dtype in (torch.float32, torch.float16):
            for name, params in modes.items():
                g = torch.Generator().manual_seed(vocab)
                cond, uncond = ((torch.randn(b, t, vocab, generator=g) * 3).to(dtype).to(device) for _ in range(2))
                current = torch.randint(0, vocab, (b, t), generator=g)
                current[torch.rand(b, t, generator=g) < 0.7] = vocab  # mostly masked, as early in decoding
                uniform = torch.rand(b, t, generator=g).to(device) if params.any_sampled else None
                tokens, probs = ksamp.sample(cond, uncond, current.to(device), vocab, params, uniform)
                ref_tokens, ref_probs = ksamp.sample_ref(cond, uncond, current.to(device), vocab, params, uniform)
                differ = int((tokens != ref_tokens).sum())
                rel = float(((probs - ref_probs).abs() / ref_probs.abs().clamp_min(1e-30)).max())
                ok = differ == 0 and rel <= 1e-5
                fails += not ok
                _emit({"check": "sample", "case": f"{name} V={vocab} {dtype}", "ok": ok, "tokens_differ": differ,
                       "prob_rel_err": rel}, out)

    import magnet_engine.kernels.matmul as kmm
    import torch.nn.functional as F

    def matmul(m: int, k: int, n: int, dtype: torch.dtype) -> None:
        """tests/test_matmul.py's criteria: error <= 2x torch's same-dtype error + one output ulp, and rows alone,
        in a prefix batch and shifted by 37 rows among others are the same bits as in the full batch."""
        nonlocal fails
        g = torch.Generator().manual_seed(m + k + n)
        x = torch.randn(m + 37, k, generator=g).to(dtype).to(device)
        w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype).to(device)
        x, others = x[37:], x[:37]
        got = kmm.invariant_matmul(x, w)
        ref = F.linear(x.double(), w.double())
        err = (got.double() - ref).abs().max().item()
        torch_err = (F.linear(x, w).double() - ref).abs().max().item()
        bound = 2 * torch_err + torch.finfo(dtype).eps * ref.abs().max().item()
        alone = all(torch.equal(kmm.invariant_matmul(x[r:r + 1], w), got[r:r + 1]) for r in (0, m // 2, m - 1))
        invariant = (alone and torch.equal(kmm.invariant_matmul(x[:m // 2 + 1], w), got[:m // 2 + 1])
                     and torch.equal(kmm.invariant_matmul(torch.cat([others, x]), w)[37:], got))
        sync()
        ok = bool(torch.isfinite(got).all()) and got.dtype == dtype and err <= bound and invariant
        fails += not ok
        _emit({"check": "invariant_matmul", "case": f"M={m} K={k} N={n} {str(dtype).removeprefix('torch.')}",
               "ok": ok, "err": err, "torch_err": torch_err, "row_invariant": invariant}, out)

    shapes = [(7, 100, 70), (130, 64, 130)]  # odd M, K and N: masked K tail, partial tiles
    if not quick:  # magnet-small's linears at B=1 (2·T = 1000 rows) and an odd batch
        shapes += [(1000, 1024, 3072), (1000, 4096, 1024), (333, 1024, 2048)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for m, k, n in shapes:
            matmul(m, k, n, dtype)

    if device.startswith("cuda") and not quick:  # the band kernel against what a model without one does
        from magnet_engine.engine.ops import band_mask
        from triton.testing import do_bench

        def median_ms(fn: Any) -> float:
            return do_bench(fn, return_mode="median")

        sdpa = torch.nn.functional.scaled_dot_product_attention
        for batch in (1, 16):
            for frames in (500, 1500):
                q, k, v = qkv(2 * batch, 16, frames, frames, 64, torch.float16, 1)
                mask = band_mask(frames, 5).to(device)
                _emit({"check": "time-band", "case": f"B={batch} T={frames} fp16",
                       "triton_band_ms": median_ms(lambda q=q, k=k, v=v: kattn.attention(q, k, v, 5)),
                       "sdpa_masked_ms": median_ms(lambda q=q, k=k, v=v, m=mask: sdpa(q, k, v, attn_mask=m)),
                       "sdpa_full_ms": median_ms(lambda q=q, k=k, v=v: sdpa(q, k, v))}, out)
    return fails


# ------------------------------------------------------------------------------------------------------- fixture


def fixture_flags(settings: dict[str, Any], run: str) -> list[str]:
    """The `magnet generate` flags of one of the fixture's runs (expected.json: defaults, then the run's entry)."""
    g = {**settings["generate_defaults"], **settings["runs"][run]}
    flags = ["--steps", ",".join(map(str, g["decoding_steps"])), "--temperature", str(g["temp"]),
             "--top-k", str(g["top_k"]), "--top-p", str(g["top_p"]),
             "--cfg", f"{g['max_cfg_coef']},{g['min_cfg_coef']}",
             "--span-arrangement", g["span_arrangement"], "--span-scoring", g["span_scoring"],
             "--duration", str(settings["frames"] / settings["frame_rate"])]
    return flags + ["--greedy"] * (not g["use_sampling"]) + ["--no-anneal-temp"] * (not g["anneal_temp"])


def check_fixture(fixture: Path, device: str, backend: str, dtype: str, runs: Sequence[str], out: TextIO | None,
                  tokens_file: Path | None) -> int:
    """-> the number of runs whose tokens differ from the reference (or that failed)."""
    import numpy as np

    settings = json.loads((fixture / "expected.json").read_text())
    expected = dict(np.load(fixture / "expected_magnet.npz"))
    saved = dict(np.load(tokens_file)) if tokens_file is not None and tokens_file.is_file() else {}
    fails = 0
    with tempfile.TemporaryDirectory(prefix="magnet-fixture-") as tmp:
        for run in runs:
            work = Path(tmp) / run
            work.mkdir()
            extra = []
            if settings["runs"][run].get("prompt") == "prompt_codes":
                np.save(work / "prompt.npy", expected["prompt_codes"])
                extra = ["--prompt-codes", str(work / "prompt.npy")]
            cmd = [sys.executable, "-m", "magnet_engine.engine.cli", "generate", *settings["prompts"], "--model",
                   str(fixture), "--device", device, "--dtype", dtype, "--backend", backend, "-o", str(work / "audio"),
                   "--tokens-out", str(work / "tokens.npy"), "--wav-subtype", "float32", "--normalize", "none",
                   "--quiet", *fixture_flags(settings, run), *extra]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            row: dict[str, Any] = {"check": "fixture", "run": run, "backend": backend, "device": device,
                                   "dtype": dtype, "rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 2)}
            if proc.returncode == 0:
                tokens = np.load(work / "tokens.npy")
                saved[f"{backend}-{dtype}-{run}"] = tokens
                want = expected[run]
                row["token_equal"] = tokens.shape == want.shape and bool((tokens == want).all())
                row["tokens_differ"] = int((tokens != want).sum()) if tokens.shape == want.shape else None
                if run == "gen_nonoverlap_max":  # the fixture's decoded_wav is the codec's decode of this run
                    import soundfile as sf

                    audio = np.stack([sf.read(work / "audio" / f"{i}.wav", dtype="float32")[0]
                                      for i in range(len(settings["prompts"]))])  # [B, samples]
                    ref = expected["decoded_wav"][:, 0]
                    if audio.shape == ref.shape:
                        row["audio_max_abs_err"] = float(np.abs(audio - ref).max())
            else:
                row["token_equal"] = False
                row["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
            fails += not row["token_equal"]
            _emit(row, out)
    if tokens_file is not None and saved:
        np.savez(tokens_file, **saved)
    return fails


# ---------------------------------------------------------------------------------------------------- dist-info


def write_dist_info(dest: Path, setup_py: Path = REPO / "setup.py") -> Path:
    """setup.py's name, version and entry points (read from its `setup(...)` call, not run) as a dist-info in
    `dest`: importlib.metadata then finds the backends and subcommands of a checkout that is only on the path."""
    tree = ast.parse(setup_py.read_text(), str(setup_py))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    kw = {k.arg: k.value for k in call.keywords}
    name, version = ast.literal_eval(kw["name"]), ast.literal_eval(kw["version"])
    groups: dict[str, list[str]] = ast.literal_eval(kw["entry_points"])
    info = dest / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("".join(f"[{group}]\n" + "".join(f"{e}\n" for e in entries) + "\n"
                                                   for group, entries in groups.items()))
    return info


# ---------------------------------------------------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m magnet_engine.bench.gpu_check", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kernels", help="the Triton kernels against their PyTorch references")
    k.add_argument("--device", default="cuda")
    k.add_argument("--quick", action="store_true", help="tiny shapes (a CPU device implies it)")
    k.add_argument("--json", type=Path, help="append the JSON lines to FILE")
    f = sub.add_parser("fixture", help="the fixture's greedy runs through `magnet generate`, token-exact")
    f.add_argument("--fixture", type=Path, required=True, help="the magnet-tiny folder")
    f.add_argument("--device", default="cuda")
    f.add_argument("--backend", default="torch")
    f.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    f.add_argument("--runs", default=",".join(FIXTURE_RUNS), help=f"comma-separated, of {', '.join(FIXTURE_RUNS)}")
    f.add_argument("--json", type=Path, help="append the JSON lines to FILE")
    f.add_argument("--tokens", type=Path, help="FILE.npz: add each run's tokens as BACKEND-DTYPE-RUN")
    d = sub.add_parser("dist-info", help="write setup.py's entry points as a dist-info into DIR")
    d.add_argument("dest", type=Path)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.what == "dist-info":
        print(write_dist_info(args.dest))
        return 0
    if not args.device.startswith("cuda"):
        os.environ["TRITON_INTERPRET"] = "1"  # before triton's first import (here or in the CLI's subprocess)
    with open(args.json, "a") if args.json else contextlib.nullcontext() as out:
        if args.what == "kernels":
            quick = args.quick or not args.device.startswith("cuda")
            fails = check_kernels(args.device, quick, out)
            what = "kernel checks"
        else:
            runs = [r for r in args.runs.split(",") if r]
            unknown = sorted(set(runs) - set(FIXTURE_RUNS))
            if unknown:
                parser().error(f"unknown fixture runs {unknown}: choose from {', '.join(FIXTURE_RUNS)}")
            fails = check_fixture(args.fixture, args.device, args.backend, args.dtype, runs, out, args.tokens)
            what = f"fixture runs ({args.backend}, {args.dtype}, {args.device}) token-exact"
    print(f"gpu_check {args.what}: {'all ' + what + ' pass' if fails == 0 else f'{fails} of the {what} FAIL'}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
