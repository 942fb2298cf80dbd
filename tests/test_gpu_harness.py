"""bench/gpu.sh, the GPU harness, through its CPU dry run (`--quick`): every stage of its list reports, each ran
(rc 0) or says why it cannot run on a CPU, and the fixture's tokens through the CLI equal the reference's (read
back from the saved tokens, not from the harness's verdict). About two minutes on 2 cores.

Also: bench/peer.py builds Hugging Face's MusicGen with the LM in a half dtype beside the fp32 text encoder, as the
harness runs it on CUDA in fp16; bf16 on CPU takes the same path (it failed with "expected mat1 and mat2 to have the
same dtype").
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES
from magnet_engine.engine.config import GenerationConfig

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.sh"
RUN_ON_CPU = {"load-static", "load-scheduler", "load-static-deterministic", "e2e-magnet-torch", "fixture-triton-fp32",
              "kernels-check", "fixture-torch-fp32", "e2e-magnet-triton", "e2e-ar-eager", "e2e-hf-musicgen"}
CUDA_ONLY = {"capture-tests", "e2e-ar-program", "load-static-graph", "load-scheduler-graph", "e2e-magnet-cuda-graph",
             "e2e-magnet-triton-graph", "bench-kernels", "load-static-deterministic-torch", "invariant-gemm"}
EXTRA = {"e2e-magnet-triton-graph", "kernels-check", "fixture-torch-fp32", "e2e-magnet-triton", "e2e-ar-eager",
         "e2e-hf-musicgen", "bench-kernels"}  # on a GPU only when ONLY names them (they ran on an H200 before)
BUDGET = 360  # gpu.sh's default: one short device call that leaves a rerun inside the session's 900 s
MAX_FILES_BACK = 8  # what a device call brings back from $OUT


def _listed() -> list[tuple[str, int, set[str]]]:
    """gpu.sh's STAGES list as written there: (name, limit in seconds, needs)."""
    text = SCRIPT.read_text()
    block = text[text.index("STAGES=(") : text.index("\n)\n", text.index("STAGES=("))]
    return [(name, int(limit), set(needs.split(","))) for name, limit, needs in
            re.findall(r'^\s*"([a-z0-9-]+)\|(\d+)\|([^|]+)\|', block, flags=re.M)]


def _listed_stages() -> list[str]:
    return [name for name, _, _ in _listed()]


def test_budget_arithmetic() -> None:
    """The default stages fit the default budget, never-run stages first, extras marked as such; the header says so."""
    stages = _listed()
    assert sum(limit for _, limit, needs in stages if "extra" not in needs) <= BUDGET
    assert {name for name, _, needs in stages if "extra" in needs} == EXTRA
    names = [name for name, _, needs in stages if "extra" not in needs]
    assert names[0] == "capture-tests" and names[-1] == "fixture-triton-fp32"  # what never ran first, parity last
    text = SCRIPT.read_text()
    assert f"BUDGET=${{BUDGET:-{BUDGET}}}" in text and f"BUDGET {BUDGET} s" in text
    assert re.search(r'^TESTS="[^"]*-k cuda"$', text, flags=re.M) and re.search(r'"capture-tests\|\d+\|cuda\|\$TESTS ',
                                                                               text)  # the test stage: CUDA tests


def _env(out: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "ONLY")}
    env.update(OUT=str(out), PYTHON=sys.executable, MAGNET_FIXTURES=str(FIXTURES.resolve()))
    return env


def test_only_filter(tmp_path: Path) -> None:
    """ONLY runs the named stages and skips the rest, saying so; a name that is no stage stops the script at once."""
    env = _env(tmp_path) | {"ONLY": "load-scheduler,capture-tests"}
    proc = subprocess.run(["bash", str(SCRIPT), "--quick"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    stages = _stages(tmp_path)
    assert stages["load-scheduler"]["status"] == "ok"
    assert stages["capture-tests"]["skipped"].startswith("needs CUDA")
    assert all(r["skipped"].startswith("not in ONLY") for n, r in stages.items()
               if n not in ("load-scheduler", "capture-tests"))
    bad = subprocess.run(["bash", str(SCRIPT), "--quick"], cwd=ROOT, env=env | {"ONLY": "load-sheduler"},
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert bad.returncode == 2 and "ONLY names no stage 'load-sheduler'" in bad.stderr


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("gpu-out")
    proc = subprocess.run(["bash", str(SCRIPT), "--quick"], cwd=ROOT, env=_env(out), capture_output=True, text=True,
                          timeout=900, stdin=subprocess.DEVNULL)
    return out, proc


def _stages(out: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert rows[0]["stage"] == "env" and rows[0]["device"] == "cpu" and rows[0]["quick"] is True
    return {r["stage"]: r for r in rows[1:]}


def test_every_stage_runs_or_says_why_not(dry_run) -> None:
    out, proc = dry_run
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    stages = _stages(out)
    listed = _listed_stages()
    assert list(stages) == listed and set(listed) == RUN_ON_CPU | CUDA_ONLY
    for name in RUN_ON_CPU:
        assert stages[name]["status"] == "ok" and stages[name]["rc"] == 0, stages[name]
    for name in CUDA_ONLY:
        assert stages[name]["status"] == "skipped" and stages[name]["skipped"].startswith("needs CUDA"), stages[name]
    assert len([p for p in out.rglob("*") if p.is_file()]) <= MAX_FILES_BACK


def test_fixture_tokens_through_the_cli(dry_run, expected) -> None:
    out, _ = dry_run
    tokens = dict(np.load(out / "fixture_tokens.npz"))
    assert set(tokens) == {"torch-float32-gen_nonoverlap_max", "triton-float32-gen_nonoverlap_max"}
    for got in tokens.values():
        np.testing.assert_array_equal(got, expected["gen_nonoverlap_max"])
    rows = [json.loads(line) for line in (out / "fixture.jsonl").read_text().splitlines()]
    assert sorted((r["backend"], r["token_equal"]) for r in rows) == [("torch", True), ("triton", True)]


def test_kernel_checks_and_benchmark_rows(dry_run) -> None:
    out, _ = dry_run
    checks = [json.loads(line) for line in (out / "kernel_check.jsonl").read_text().splitlines()]
    assert {c["check"] for c in checks} == {"attention", "sample", "invariant_matmul"} and all(c["ok"] for c in checks)
    rows = [json.loads(line) for line in (out / "e2e.jsonl").read_text().splitlines()]
    assert sorted((r["kind"], r["backend"]) for r in rows) == [
        ("ar", "torch"), ("hf-musicgen", "hf"), ("magnet", "torch"), ("magnet", "triton")]
    assert all(r["device"] == "cpu" and r["batch"] == 1 for r in rows)
    rows = [json.loads(line) for line in (out / "load.jsonl").read_text().splitlines()]
    assert [(r["policy"], r["backend"], r["cuda_graph"], r["deterministic"], r["requests"]) for r in rows] == [
        ("static", "torch", False, False, 2), ("scheduler", "torch", False, False, 2),
        ("static", "torch", False, True, 2)]  # the Triton GEMM's burst on CUDA only (interpreted: too slow)
    steps = sum(GenerationConfig().steps)  # the tiny preset runs the default schedule
    for r in rows:  # the two requests start together and share every pass
        assert r["batch_hist"] == {"2": steps}, r


@pytest.mark.parametrize("dim", [64, 32], ids=["same-width", "projected"])
def test_peer_half_lm_beside_fp32_text_encoder(dim: int) -> None:
    """The tiny preset's T5 is 64-d: an LM of width 64 takes its states as they are, one of width 32 through
    `enc_to_dec_proj`. Either way the half LM must get states of its own dtype."""
    from magnet_engine.bench.common import StageClock
    from magnet_engine.bench.peer import build_peer, peer_request
    from magnet_engine.bench.presets import WordTokenizer, get_preset

    cpu = torch.device("cpu")
    preset = dataclasses.replace(get_preset("tiny"), dim=dim, num_heads=4)
    model, _ = build_peer(preset, cpu, torch.bfloat16)
    assert (getattr(model, "enc_to_dec_proj", None) is not None) == (dim != 64)
    assert {p.dtype for p in model.decoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.text_encoder.parameters()} == {torch.float32}
    frames = peer_request(model, WordTokenizer(), ["a calm pad", "fast drums"], frames=3, do_sample=False, seed=0,
                          device=cpu)(StageClock(cpu))
    assert frames == 3
