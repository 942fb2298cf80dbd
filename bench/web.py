"""`python -m magnet_engine.bench web`: one request (text -> tokens -> audio) in the web page, in headless Chromium
with onnxruntime-web's WASM (1 and 2 threads), against the Node client (export/node/bench.mjs) and the Python engine's
onnxruntime backend on the same exports, in one run. Median of N after a warm-up, greedy and sampled; one JSON line
per (client, export, threads).

    python -m magnet_engine.bench web --dir runs/default-onnx-int8 --threads 1 2 --repeats 5 --json rows.jsonl

Hold the CPU lock around it (`flock /tmp/magnet-cpu.lock ...`); the browser is the system's Chromium.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from magnet_engine.bench.schema import emit
from magnet_engine.export import web

NODE_DIR = Path(web.__file__).resolve().parent / "node"
PROMPT = "a fast techno beat with a deep bass"  # export/node/bench.mjs's
MODES = {"greedy": {"greedy": True}, "sampled": {"seed": 0}}


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def page_rows(export_dir: Path, threads: Sequence[int], repeats: int, chromium: str) -> list[dict]:
    web.write_page(export_dir)
    server = web.make_server(export_dir, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    rows = []
    try:
        for t in threads:
            ops = [{"op": "goto", "url": f"{url}?backend=wasm&threads={t}"}]
            for settings in MODES.values():
                ops += [{"op": "call", "fn": "generate", "args": [[PROMPT], settings]}] * (repeats + 1)
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "script.json").write_text(json.dumps(ops))
                done = subprocess.run(["node", str(NODE_DIR / "browser.mjs"), chromium, str(Path(tmp) / "script.json")],
                                      capture_output=True, text=True, timeout=1800, check=True)
            said = json.loads(done.stdout.strip().splitlines()[-1])
            loaded, *calls = said["results"]
            if said["errors"] or any("ok" not in c for c in calls):
                raise RuntimeError(f"the page failed: {said['errors'] or [c for c in calls if 'ok' not in c][0]}")
            medians = {}
            for i, mode in enumerate(MODES):
                runs = calls[i * (repeats + 1):(i + 1) * (repeats + 1)][1:]  # the first warms up
                medians[mode] = _median([c["ok"]["seconds"] for c in runs])
            audio_s = calls[0]["ok"]["samples"] / json.loads((export_dir / "manifest.json").read_text())[
                "client"]["sample_rate"]
            rows.append({"bench": "web-request", "client": "chromium-wasm", "dir": str(export_dir), "threads": t,
                         "runtime": loaded["runtime"], "load_s": loaded["load_s"], "audio_s": audio_s,
                         "request_s": medians})
    finally:
        server.shutdown()
        server.server_close()
    return rows


def node_rows(export_dir: Path, threads: Sequence[int], repeats: int) -> list[dict]:
    rows = []
    for t in threads:
        done = subprocess.run(["node", str(NODE_DIR / "bench.mjs"), str(export_dir), str(t), str(repeats)],
                              capture_output=True, text=True, timeout=1800, check=True)
        rows.append({**json.loads(done.stdout.strip().splitlines()[-1]), "client": "node"})
    return rows


def python_rows(export_dir: Path, threads: Sequence[int], repeats: int) -> list[dict]:
    """The engine's onnxruntime backend (magnet generate --model DIR), torch's and onnxruntime's threads = t."""
    import time

    import onnxruntime as ort
    import torch
    from magnet_engine.export.ort import load_engine

    rows = []
    for t in threads:
        torch.set_num_threads(t)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = t, 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        t0 = time.perf_counter()
        eng = load_engine(export_dir, session_options=opts)
        load_s = time.perf_counter() - t0
        medians = {}
        for mode, settings in MODES.items():
            times = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                eng.generate([PROMPT], **settings)
                times.append(time.perf_counter() - t0)
            medians[mode] = _median(times[1:])
        rows.append({"bench": "python-request", "client": "python-onnx", "dir": str(export_dir), "threads": t,
                     "load_s": load_s, "request_s": medians, "torch": torch.__version__})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m magnet_engine.bench web", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", action="append", required=True, help="an export folder (repeatable)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chromium", default=os.environ.get("MAGNET_CHROMIUM") or shutil.which("chromium"))
    p.add_argument("--json", default=None, help="append the rows to this JSON-lines file")
    args = p.parse_args(argv)
    if not args.chromium:
        p.error("no Chromium: apt-get install -y chromium, or --chromium PATH")
    chromium_version = subprocess.run([args.chromium, "--version"], capture_output=True, text=True).stdout.strip()
    machine = {"cpu": _cpu_model(), "chromium": chromium_version, "node": subprocess.run(
        ["node", "--version"], capture_output=True, text=True).stdout.strip(), "python": platform.python_version()}
    rows = []
    for d in map(Path, args.dir):
        rows += [{**r, **machine} for r in page_rows(d, args.threads, args.repeats, args.chromium)]
        rows += [{**r, **machine} for r in node_rows(d, args.threads, args.repeats)]
        rows += [{**r, **machine} for r in python_rows(d, args.threads, args.repeats)]
    emit(rows, args.json)
    return 0


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
