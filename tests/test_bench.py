"""The benchmark harness: tiny preset end to end (MAGNeT, our AR engine, the transformers peer), rows valid against
the schema, the report's table and PNGs, the dispatcher, one-line CLI errors. A few seconds on a 2-core CPU."""
from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from magnet_engine.bench import __main__ as dispatcher
from magnet_engine.bench import e2e, report, schema

# shortest useful request: 0.3 s = 15 frames (a multiple of the span 3: no trim), 5 MAGNeT passes, one thread
FAST = ["--model", "tiny", "--duration", "0.3", "--repeats", "2", "--warmup", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    path = tmp_path_factory.mktemp("bench") / "rows.jsonl"
    try:
        assert e2e.main([*FAST, "--kind", "magnet", "--batch", "1,2", "--steps", "2,1,1,1", "--set", "top_k=5",
                         "--json", str(path)]) == 0
        assert e2e.main([*FAST, "--kind", "ar", "--batch", "1,2", "--json", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)  # --threads is process-wide; leave other tests as they were
    return path


def test_rows_validate(rows_file: Path) -> None:
    rows = schema.read_rows([rows_file])
    assert [(r["kind"], r["batch"]) for r in rows] == [("magnet", 1), ("magnet", 2), ("ar", 1), ("ar", 2)]
    for r in rows:
        assert schema.row_errors(r) == []
        assert r["model"] == "tiny" and r["backend"] == "torch" and r["device"] == "cpu" and r["dtype"] == "float32"
        assert r["repeats"] == 2 and r["warmup"] == 1 and len(r["warmup_s"]) == 1
        lat, st = r["latency_s"], r["stages_s"]
        assert 0 < lat["p20"] <= lat["median"] <= lat["p80"]
        assert all(st[k] > 0 for k in ("text", "lm", "codec"))
        assert r["audio_s_per_s"] == pytest.approx(r["batch"] * r["audio_s"] / lat["median"])
        assert r["peak_mem_mb"] > 0 and r["weights"] == "random"
    magnet, ar = rows[0], rows[2]
    assert magnet["frames"] == 15 and magnet["steps"] == [2, 1, 1, 1] and magnet["passes"] == 5
    assert magnet["scenario"].endswith("/steps2-1-1-1/top_k=5")
    assert ar["frames"] == 15 and ar["passes"] == 15 + 3  # one step per frame plus the 3-step delay tail


def test_schema_rejects_bad_rows(rows_file: Path) -> None:
    row = json.loads(rows_file.read_text().splitlines()[0])
    broken = copy.deepcopy(row)
    del broken["stages_s"]["codec"]
    broken["batch"] = "1"
    errors = schema.row_errors(broken)
    assert "row.stages_s.codec: missing" in errors and any(e.startswith("row.batch:") for e in errors)
    with pytest.raises(ValueError, match="invalid benchmark row"):
        schema.validate_row(broken)
    flagged = dict(row, batch=True)  # bool is an int subclass: still rejected
    assert schema.row_errors(flagged)


def test_report_table_and_plots(rows_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    md = tmp_path / "report.md"
    assert report.main([str(rows_file), "--md", str(md), "--plots", str(tmp_path / "plots")]) == 0
    text = md.read_text()
    assert text.count("| tiny |") == 4  # one line per scenario
    assert "MAGNeT vs AR" in text and "MAGNeT / AR (MusicGen, ours)" in text
    for name in ("latency_vs_batch.png", "throughput_vs_batch.png"):
        png = (tmp_path / "plots" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_hf_peer_row(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    path = tmp_path / "hf.jsonl"
    threads = torch.get_num_threads()
    try:
        assert e2e.main([*FAST, "--kind", "hf-musicgen", "--batch", "1", "--repeats", "1", "--json", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    (row,) = schema.read_rows([path])
    assert row["kind"] == "hf-musicgen" and row["backend"] == "hf" and row["frames"] == 15
    assert row["stages_s"]["text"] > 0 and row["stages_s"]["codec"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-model"], "neither a preset"),
    (["--model", "magnet-small-10secs", "--kind", "ar"], "is a magnet model"),
    (["--model", "tiny", "--batch", "0"], "--batch takes positive integers"),
    (["--model", "tiny", "--kind", "ar", "--steps", "1,1,1,1"], "--steps applies to MAGNeT only"),
    (["--model", "tiny", "--kind", "magnet", "--backend", "onnx"], "runs exported graphs"),
    (["--model", "tiny", "--set", "no_such=1"], "unknown setting no_such"),
])
def test_cli_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert e2e.main([*argv, "--duration", "0.3", "--repeats", "1", "--warmup", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench e2e: error:") and message in err and err.count("\n") == 1


def test_dispatcher_routes_lazily(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    seen: dict[str, list[str]] = {}
    for name in ("kernels", "onnx"):
        fake = types.ModuleType(f"magnet_engine.bench.{name}")
        fake.main = lambda argv, name=name: seen.setdefault(name, list(argv)) and 0  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, f"magnet_engine.bench.{name}", fake)
    assert dispatcher.main(["kernels", "--quick"]) == 0 and dispatcher.main(["onnx", "--x", "1"]) == 0
    assert seen == {"kernels": ["--quick"], "onnx": ["--x", "1"]}
    assert dispatcher.main(["nope"]) == 2
    assert "unknown subcommand" in capsys.readouterr().err
    assert dispatcher.main([]) == 2 and dispatcher.main(["--help"]) == 0


@pytest.mark.parametrize("policy", ["sequential", "static", "batch", "scheduler"])
def test_load_rows_and_plot(fixture_dir: Path, tmp_path: Path, policy: str) -> None:
    """`bench load`: every request of the trace is served and counted once per step in the pass histogram, under
    each policy; the rows plot."""
    from magnet_engine.bench import load

    rows, threads = tmp_path / "load.jsonl", torch.get_num_threads()
    try:
        assert load.main(["--model", str(fixture_dir), "--policy", policy, "--scheduler-load", "caller",
                          "--requests", "3", "--repeats", "1", "--max-batch", "2", "--min-duration", "0.3",
                          "--max-duration", "0.6", "--steps-mix", "2,1,1,1", "--threads", "1", "--out", str(rows)]) == 0
    finally:
        torch.set_num_threads(threads)  # --threads is process-wide
    (row,) = [json.loads(line) for line in rows.read_text().splitlines()]
    assert row["requests"] == 3 and row["model"] == str(fixture_dir) and row["policy"] == policy
    assert all(1 <= int(k) <= 2 for k in row["batch_hist"]) and row["latency_s"]["p50"] >= row["queue_wait_s"]["p50"]
    assert sum(int(k) * n for k, n in row["batch_hist"].items()) == 3 * 5  # 3 requests of 2+1+1+1 steps
    png = tmp_path / "load.png"
    assert load.main(["--plot", str(rows), str(png)]) == 0 and png.stat().st_size > 0
    assert load.main(["--plot", str(tmp_path / "missing.jsonl"), str(png)]) == 2


def test_kernels_invariant_matmul_dry_run(tmp_path: Path) -> None:
    """`bench kernels --what invariant_matmul --device cpu --quick` (gpu.sh's deterministic-cost stage as a CPU dry
    run, Triton's interpreter): every linear of a pass against both baselines, each kernel output within the dtype's
    rounding of F.linear, and the pass row = layers x the layer's linears + one head."""
    pytest.importorskip("triton", reason="triton is not installed: pip install 'triton>=3.2' (extra [triton])")
    from magnet_engine.bench import kernels
    from magnet_engine.bench.presets import PRESETS

    out = tmp_path / "k.jsonl"
    assert kernels.main(["--what", "invariant_matmul", "--device", "cpu", "--quick", "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    names = ("qkv", "out", "cross-q", "cross-out", "ffn-up", "ffn-down", "head")
    assert [(r["op"], r["baseline"]) for r in rows] == [
        (f"linear-{n}", b) for n in names for b in ("F.linear", "invariant_linear")] + [
        ("linear-pass", "F.linear"), ("linear-pass", "invariant_linear")]
    cfg = PRESETS["tiny"].model_config("magnet")
    for r in rows[:-2]:
        eps = torch.finfo(kernels.DTYPES[r["dtype"]]).eps
        # The outputs are ~N(0, 1), |out| <= 8. fp16: both round nearly the same fp32 sum once, one ulp apart at most;
        # fp32 (the head, K = dim): each sum is within K·eps·Σ|x·w| (<= 8) of the exact one.
        bound = 8 * eps if r["dtype"] == "fp16" else 2 * cfg.dim * eps * 8
        assert r["dtype"] == ("fp32" if r["op"] == "linear-head" else "fp16") and 0 <= r["check"] <= bound, r
    layers = cfg.num_layers
    for pass_row in rows[-2:]:
        parts = [r for r in rows[:-2] if r["baseline"] == pass_row["baseline"]]
        want = sum(r["torch_ms"] * (1 if r["op"] == "linear-head" else layers) for r in parts)
        assert pass_row["torch_ms"] == pytest.approx(want) and pass_row["kernel_ms"] > 0


def test_bench_serve_reports_p95_beside_a_stream(capsys):
    """`bench serve --beside-stream S` against a stand-in service (no Ray): one streamed request sent at the start
    and read as it comes (time to first audio, to the end) beside the load, whose p95 is reported."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from magnet_engine.bench.serve import main

    streamed: list[dict] = []

    class Service(BaseHTTPRequestHandler):  # HTTP/1.0: a body without a length ends when the connection closes
        def log_message(self, *_: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = json.dumps({"status": "ok", "waiting": 0, "decoding": 0}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802
            job = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            if job.get("stream"):
                streamed.append(job)
                self.end_headers()
                self.wfile.write(b"R" * 44)  # the WAV header first, then a window at a time
                for _ in range(4):
                    time.sleep(0.3)
                    self.wfile.write(b"\0" * 1000)
                    self.wfile.flush()
            else:
                time.sleep(0.05)
                self.send_header("Content-Length", "100")
                self.end_headers()
                self.wfile.write(b"\0" * 100)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Service)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert main(["--url", url, "--rate", "10", "--seconds", "1", "--beside-stream", "30", "--drain", "10"]) == 0
    finally:
        server.shutdown()
        server.server_close()
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["statuses"] == {"200": row["requests"]} and row["latency_s"]["p95"] >= row["latency_s"]["p50"] > 0
    stream = row["beside_stream"]
    assert [j["duration"] for j in streamed] == [30.0] and stream["status"] == 200 and stream["bytes"] == 4044
    assert stream["sent_s"] < 0.5 and 0.2 < stream["first_audio_s"] < stream["total_s"] and stream["covered_load"]


def test_load_ratio_row(fixture_dir: Path, tmp_path: Path) -> None:
    """`bench load --ratio`: the static batch (one Engine.generate per batch) and the scheduler run the same trace in
    one process, in turns, and the ratio row is the median of the turns' scheduler/static throughput ratios, from
    their rows."""
    import statistics

    from magnet_engine.bench import load

    rows, threads = tmp_path / "load.jsonl", torch.get_num_threads()
    try:
        assert load.main(["--model", str(fixture_dir), "--ratio", "--requests", "3", "--repeats", "2",
                          "--max-batch", "3", "--min-duration", "0.3", "--max-duration", "0.3", "--steps-mix",
                          "2,1,1,1", "--threads", "1", "--out", str(rows)]) == 0
    finally:
        torch.set_num_threads(threads)  # --threads is process-wide
    got = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [r.get("policy") for r in got] == ["batch", "batch", "scheduler", "scheduler", None]
    for r in got[:4]:  # 3 requests of 2+1+1+1 steps, each counted once per pass
        assert r["requests"] == 3 and sum(int(k) * n for k, n in r["batch_hist"].items()) == 3 * 5
    assert got[0]["batch_hist"] == {"3": 5}  # one generate call of the 3 (equal settings, consecutive seeds)
    ratio = got[-1]
    assert ratio["bench"] == "load-ratio" and ratio["requests"] == 3
    assert ratio["batch_throughput_rps"] == [r["throughput_rps"] for r in got[:2]]
    assert ratio["scheduler_throughput_rps"] == [r["throughput_rps"] for r in got[2:4]]
    turns = [b / a for a, b in zip(ratio["batch_throughput_rps"], ratio["scheduler_throughput_rps"])]
    assert ratio["value"] == round(statistics.median(turns), 3)
    want = statistics.median(ratio["scheduler_throughput_rps"]) / statistics.median(ratio["batch_throughput_rps"])
    assert ratio["ratio_of_medians"] == round(want, 3)
