"""The HTTP service on Ray Serve, end to end on loopback: one two-node Ray cluster (ray.cluster_utils.Cluster, one CPU
per node) for the whole module, with two applications: `main` (two replicas, one per node, deterministic: a request's
bytes do not depend on what it is batched with) and `tight` (one replica, one request decoding and one waiting, an
API key) for the overflow, deadline and auth cases."""
from __future__ import annotations

import base64
import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from magnet_engine.serve.cli import ray_environment

ray_environment()  # before `import ray`: Ray reads it once

KEY = "s3cret-key"
SLOW = [150, 50, 50, 50]  # decoding steps that keep the tiny model busy for about a second
FAST = {"steps": [2, 1, 1, 1]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: bytes | dict | None = None, headers: dict | None = None,
         timeout: float = 120) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers.items()), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), e.read()


@pytest.fixture(scope="module")
def cluster(fixture_dir: Path):
    import ray
    from magnet_engine.serve.cli import start
    from magnet_engine.serve.config import LaunchConfig, ServiceConfig, key_digest
    from ray import serve
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    port = free_port()
    model = str(fixture_dir)
    running = []
    try:
        running.append(start(ServiceConfig(model=model, device="cpu", max_batch=4, max_queue=8, deterministic=True),
                             LaunchConfig(port=port, replicas=2, replica_cpus=1.0), "main", "/"))
        running.append(start(ServiceConfig(model=model, device="cpu", max_batch=1, max_queue=1, timeout=60,
                                           api_key_sha256=key_digest(KEY)),
                             LaunchConfig(port=port, replicas=1, replica_cpus=0.0), "tight", "/tight"))
        yield {"main": running[0].url, "tight": running[1].url, "nodes": c, "model": model}
    finally:
        for r in running:
            r.stop()
        serve.shutdown()
        ray.shutdown()
        c.shutdown()


def test_ready_health_model_and_schema(cluster):
    status, _, body = call(cluster["main"] + "/v1/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, _, body = call(cluster["main"] + "/v1/model")
    info = json.loads(body)
    assert status == 200 and info["config"]["n_q"] == 4 and info["sample_rate"] == 32000
    assert info["limits"]["max_batch"] == 4 and info["defaults"]["steps"] == [20, 10, 10, 10]
    # the request schema is built from GenerationConfig: every field, with the model's default
    from magnet_engine.engine.config import GenerationConfig

    _, _, body = call(cluster["main"] + "/openapi.json")
    schema = json.loads(body)["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    levers = {"rescore_weight", "ar_cfg"}  # need an AR model, which no HTTP request has
    keys = {f.name for f in fields(GenerationConfig)} - levers | {"prompt", "format", "timeout", "stream"}
    assert keys == set(schema["properties"])
    assert schema["properties"]["steps"]["default"] == [20, 10, 10, 10] and schema["required"] == ["prompt"]


def test_same_seed_as_the_cli(cluster, tmp_path):
    """The same bytes as `magnet generate PROMPT --seed S --deterministic` with the same fields (the service runs
    deterministic); the JSON answer's tokens too."""
    import torch
    from magnet_engine.engine.cli import main

    fields_ = {"seed": 7, "steps": [4, 2, 2, 2], "cfg": [3.0, 1.0], "duration": 0.5}
    status, headers, wav = call(cluster["main"] + "/v1/generate", {"prompt": "warm piano chords", **fields_})
    assert status == 200 and headers["content-type"] == "audio/wav" and headers["x-seed"] == "7"
    assert float(headers["x-audio-duration"]) == pytest.approx(0.5, abs=0.03) and float(headers["x-latency"]) > 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the replica (one Ray CPU)
    try:
        for out in ("cli.wav", "cli.flac"):
            assert main(["generate", "warm piano chords", "--model", cluster["model"], "--device", "cpu", "--quiet",
                         "--deterministic", "--seed", "7", "--steps", "4,2,2,2", "--cfg", "3,1", "--duration", "0.5",
                         "-o", str(tmp_path / out), "--tokens-out", str(tmp_path / "cli.npy")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert wav == (tmp_path / "cli.wav").read_bytes()
    status, _, body = call(cluster["main"] + "/v1/generate", {"prompt": "warm piano chords", **fields_},
                           {"Accept": "application/json"})
    out = json.loads(body)
    assert status == 200 and np.array_equal(np.array(out["tokens"]), np.load(tmp_path / "cli.npy")[0])
    assert base64.b64decode(out["audio"]) == wav and out["seed"] == 7
    status, headers, flac = call(cluster["main"] + "/v1/generate", {"prompt": "warm piano chords", **fields_,
                                                                     "format": "flac"})
    assert headers["content-type"] == "audio/flac" and flac == (tmp_path / "cli.flac").read_bytes()


def test_long_piece_streamed_and_whole(cluster, tiny):
    """Past the segment: "stream": true sends a WAV a window at a time (chunked, length left open), whose samples are
    Engine.generate's for the same seed; without it the whole piece comes as one normalised WAV of the right length."""
    import torch
    from magnet_engine.engine.audio import pcm16_bytes, wav_stream_header

    fields_ = {"seed": 3, "steps": [2, 1, 1, 1], "duration": 2.5}
    status, headers, body = call(cluster["main"] + "/v1/generate", {"prompt": "rain", **fields_, "stream": True})
    assert status == 200 and headers["content-type"] == "audio/wav" and headers.get("transfer-encoding") == "chunked"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the replica (one Ray CPU)
    try:
        want = tiny.generate(["rain"], seed=3, steps=(2, 1, 1, 1), duration=2.5).audio[0]  # [1, samples]
    finally:
        torch.set_num_threads(threads)
    assert want.shape[-1] == round(2.5 * tiny.config.frame_rate) * tiny.codec.config.hop_length
    assert body[:44] == wav_stream_header(tiny.sample_rate) and body[44:] == pcm16_bytes(want)
    status, headers, wav = call(cluster["main"] + "/v1/generate", {"prompt": "rain", **fields_})
    assert status == 200 and float(headers["x-audio-duration"]) == pytest.approx(2.5)
    status, _, body = call(cluster["main"] + "/v1/generate", {"prompt": "rain", "stream": True, "format": "flac"})
    assert status == 422 and json.loads(body)["field"] == "stream"


def test_concurrent_requests_and_the_client(cluster):
    """Requests decoded together give what each gives alone (same seed, same bytes: the app is deterministic, so
    a near-tie cannot flip when batched); no seed: one is drawn and returned, and it reproduces the audio."""
    from magnet_engine.serve.client import Client

    def one(i: int) -> tuple[int, dict, bytes]:
        return call(cluster["main"] + "/v1/generate", {"prompt": f"drums {i % 3}", "seed": i % 3, **FAST})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    assert all(status == 200 for status, _, _ in answers)
    for i, (_, _, wav) in enumerate(answers):
        assert wav == answers[i % 3][2]
    client = Client(cluster["main"])
    first = client.generate_result("rain", **FAST)
    audio, sr = client.generate("rain", seed=first.seed, **FAST)
    assert sr == first.sample_rate == 32000 and np.array_equal(audio, first.audio)
    unconditional, _ = client.generate(None, seed=2, **FAST)  # "prompt": null -> a sample without text
    assert unconditional.shape == audio.shape and not np.array_equal(unconditional, audio)


@pytest.mark.parametrize("body, status, field", [
    (b"not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"seed": 1}, 422, "prompt"),
    ({"prompt": 3}, 422, "prompt"),
    ({"prompt": "   "}, 422, "prompt"),
    ({"prompt": "x" * 2001}, 422, "prompt"),
    ({"prompt": "x", "temperature": "hot"}, 422, "temperature"),
    ({"prompt": "x", "top_p": 2}, 422, "top_p"),
    ({"prompt": "x", "steps": [0, 1, 1, 1]}, 422, "steps"),
    ({"prompt": "x", "greedy": 1}, 422, "greedy"),
    ({"prompt": "x", "stream": "yes"}, 422, "stream"),
    ({"prompt": "x", "duration": 1e6}, 422, "duration"),
    (b'{"prompt": "x", "cfg": [NaN]}', 422, "cfg"),
    (b'{"prompt": "x", "duration": Infinity}', 422, "duration"),
    ({"prompt": "x", "duration": 30, "context": 5}, 422, "context"),  # context past the 1 s window
    ({"prompt": "x", "seed": -1}, 422, "seed"),
    ({"prompt": "x", "format": "mp3"}, 422, "format"),
    ({"prompt": "x", "timeout": 0}, 422, "timeout"),
    ({"prompt": "x", "timeout": "soon"}, 422, "timeout"),
    ({"prompt": "x", "bogus": 1}, 422, None),
    ({"prompt": "x", "model": "/etc/passwd"}, 422, None),  # no request names a model or a file
    ({"prompt": "x", "prompt_codes": [[[1]]]}, 422, None),  # nor reaches Engine.request's other arguments
    ({"prompt": "x", "device": "cuda"}, 422, None),
    ({"prompt": "x", "pad": "a" * 70_000}, 413, None),
])
def test_bad_input(cluster, body, status, field):
    got, headers, raw = call(cluster["main"] + "/v1/generate", body)
    assert headers.get("content-type") == "application/json", (got, headers)
    err = json.loads(raw)
    assert got == status, err
    assert set(err) <= {"error", "field"} and err["error"]
    assert err.get("field") == field
    if field is not None:
        assert field in err["error"]
    if isinstance(body, dict) and status == 422 and field is None:  # an unknown key is named
        assert next(k for k in body if k != "prompt") in err["error"]


def test_auth(cluster):
    url = cluster["tight"] + "/v1/generate"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        status, got, raw = call(url, {"prompt": "x", **FAST}, headers)
        assert status == 401 and got["www-authenticate"] == "Bearer" and "API key" in json.loads(raw)["error"]
    assert call(cluster["tight"] + "/v1/model")[0] == 401
    assert call(cluster["tight"] + "/v1/health")[0] == 200
    assert call(url, {"prompt": "x", **FAST}, {"Authorization": f"Bearer {KEY}"})[0] == 200


def test_queue_full_503_and_deadline_504(cluster):
    """One decoding, one waiting: a burst gets 200s and 503s with Retry-After, nothing else; a deadline -> 504."""
    auth = {"Authorization": f"Bearer {KEY}"}
    url = cluster["tight"] + "/v1/generate"

    def one(i: int) -> tuple[int, dict, bytes]:
        return call(url, {"prompt": "long", "seed": i, "steps": SLOW}, auth)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(one, range(6)))
    codes = sorted(status for status, _, _ in answers)
    assert set(codes) == {200, 503} and codes.count(200) >= 2, codes
    for status, headers, raw in answers:
        if status == 503:
            assert int(headers.get("retry-after", 0)) >= 1 and "max_queue" in json.loads(raw)["error"], (headers, raw)
    status, _, raw = call(url, {"prompt": "long", "steps": SLOW, "timeout": 0.2}, auth)
    assert status == 504 and json.loads(raw)["field"] == "timeout"
    assert call(url, {"prompt": "after", **FAST}, auth)[0] == 200  # the replica serves on


def test_two_nodes_one_replica_each(cluster):
    """--replicas 2 on a two-node cluster: one replica per node, and both serve."""
    import ray

    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    seen: set[str] = set()
    deadline = time.monotonic() + 60
    while seen != nodes and time.monotonic() < deadline:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: call(cluster["main"] + "/v1/generate",
                                                   {"prompt": "x", "seed": i, **FAST}), range(4)))
        seen |= {headers["x-replica"].split("/")[0] for _, headers, _ in answers}
    assert seen == nodes


def wait_replaced(cluster: dict) -> None:
    """After a model replica of `main` was killed: Serve has started one in its place (on the freed node) and the
    application runs again, before the next test."""
    from magnet_engine.bench.serve import replica_pids
    from magnet_engine.serve.config import MODEL_DEPLOYMENT
    from ray import serve

    deadline = time.monotonic() + 90
    while len(replica_pids(MODEL_DEPLOYMENT, app="main")) < 2 or call(cluster["main"] + "/v1/health")[0] != 200:
        assert time.monotonic() < deadline, "Serve did not replace the killed replica"
        time.sleep(0.5)
    while serve.status().applications["main"].status != "RUNNING":
        assert time.monotonic() < deadline, serve.status().applications["main"]
        time.sleep(0.5)


def test_a_replica_sigkilled_under_load_loses_nothing(cluster):
    """12 slow requests over the two model replicas (each holds 4 decoding and 2 waiting), then one replica's process
    is SIGKILLed by its pid. Every request ends 200, 503 or 504, never 500, and none hangs: what the dead replica held
    comes back from the survivor, retried by the ingress (X-Retries), and a retried request's audio equals the same
    request sent again with its X-Seed (the app is deterministic). Serve then starts a replica in its place."""
    import os
    import signal

    from magnet_engine.bench.serve import replica_pids
    from magnet_engine.serve.config import MODEL_DEPLOYMENT

    pids = replica_pids(MODEL_DEPLOYMENT, app="main")
    assert len(pids) == 2, pids

    def one(i: int) -> tuple[int, dict, bytes]:
        return call(cluster["main"] + "/v1/generate", {"prompt": f"storm {i}", "seed": i, "steps": SLOW}, timeout=90)

    with ThreadPoolExecutor(12) as pool:
        pending = [pool.submit(one, i) for i in range(12)]
        time.sleep(1.0)  # all 12 placed, the first batches decoding
        assert not any(p.done() for p in pending)
        os.kill(pids[0], signal.SIGKILL)
        answers = [p.result(timeout=120) for p in pending]
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 503, 504}, statuses
    retried = [(headers, wav) for status, headers, wav in answers if status == 200 and int(headers["x-retries"])]
    assert retried, [(s, h.get("x-retries")) for s, h, _ in answers]
    headers, wav = retried[0]
    i = int(headers["x-seed"])
    status, again, wav_again = call(cluster["main"] + "/v1/generate",
                                    {"prompt": f"storm {i}", "seed": i, "steps": SLOW}, timeout=90)
    assert status == 200 and again["x-retries"] == "0" and wav_again == wav
    wait_replaced(cluster)


def test_a_stream_whose_replica_is_sigkilled_resumes_on_the_survivor(cluster):
    """A long piece streamed a window at a time; after its first windows arrived, its replica's process (named by
    X-Replica) is SIGKILLed. The client still reads one whole WAV: the ingress resumed the stream on the other
    replica from the first window it lacked, and the bytes equal the same request streamed again (deterministic)."""
    import os
    import signal

    import ray
    from magnet_engine.serve.config import MODEL_DEPLOYMENT

    body = {"prompt": "drifting pad", "seed": 5, "duration": 3.5, "steps": [60, 20, 20, 20], "stream": True}
    req = urllib.request.Request(cluster["main"] + "/v1/generate", json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=120) as r:
        replica = r.headers["x-replica"].split("/")[1]
        actor = ray.get_actor(f"SERVE_REPLICA::main#{MODEL_DEPLOYMENT}#{replica}", namespace="serve")
        pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
        got = r.read1(1 << 16)  # the WAV header (and maybe a window): the stream is under way
        os.kill(pid, signal.SIGKILL)
        got += r.read()
    status, _, again = call(cluster["main"] + "/v1/generate", body, timeout=120)
    assert status == 200 and len(again) > 44 and got == again
    wait_replaced(cluster)


def test_bench_serve_closed_loop(cluster, capsys):
    """python -m magnet_engine.bench serve against the running service: every request counted, by status."""
    from magnet_engine.bench.serve import main

    assert main(["--url", cluster["main"], "--concurrency", "2", "--seconds", "2", "--steps", "2,1,1,1",
                 "--duration", "0.5"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["requests"] >= 2 and row["statuses"] == {"200": row["requests"]}
    assert sum(map(sum, row["per_second"].values())) == row["requests"] and row["latency_s"]["p50"] > 0
    with pytest.raises(SystemExit):
        main(["--url", "http://10.0.0.1:8000", "--rate", "1"])  # loopback only


def test_a_replica_that_cannot_load_fails_the_start_with_its_own_error(cluster):
    """A model that does not load: start() raises the replica's error (not Serve's generic one) and removes the app;
    the other applications keep serving."""
    from magnet_engine.serve.cli import start
    from magnet_engine.serve.config import LaunchConfig, ServiceConfig

    port = int(cluster["main"].rsplit(":", 1)[1])
    with pytest.raises(RuntimeError, match="not found"):
        start(ServiceConfig(model="/nonexistent/model", device="cpu"), LaunchConfig(port=port, replica_cpus=0.0),
              "bad", "/bad")
    from ray import serve

    assert "bad" not in serve.status().applications
    assert call(cluster["main"] + "/v1/health")[0] == 200


def asgi_call(app, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One request through the ASGI app in this process (no Ray, no sockets); a fault the app re-raises after
    answering (Starlette does, for the server's log) is swallowed here once the answer is sent."""
    import asyncio

    sent: list[dict] = []

    async def run() -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        hdrs = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
                 "raw_path": path.encode(), "query_string": b"", "headers": hdrs, "scheme": "http",
                 "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "root_path": ""}
        try:
            await app(scope, receive, send)
        except Exception:  # noqa: BLE001 - re-raised after the answer was sent
            assert any(m["type"] == "http.response.body" for m in sent)

    asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    return (start["status"], {k.decode(): v.decode() for k, v in start["headers"]},
            b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


@pytest.fixture(scope="module")
def local_service(fixture_dir: Path):
    """The replica's Service and app without Ray, with an API key."""
    from magnet_engine.serve.config import ServiceConfig, key_digest
    from magnet_engine.serve.http import Service, build_app

    seen: list[tuple[int, float]] = []
    metrics = type("M", (), {"request": lambda self, status, latency: seen.append((status, latency))})()
    service = Service(ServiceConfig(model=str(fixture_dir), device="cpu", api_key_sha256=key_digest(KEY)), metrics)
    try:
        yield service, build_app(service), seen
    finally:
        service.close()


def test_a_server_fault_answers_a_request_id_and_logs_the_traceback(local_service, monkeypatch):
    """No exception text reaches the client: a 500 with a request id and a generic message; the log has the id
    and the traceback; the metrics count the 500."""
    service, app, seen = local_service

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail of /internal/path")

    monkeypatch.setattr(service.scheduler, "submit", broken)
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # Ray may have stopped "ray.serve" from propagating to pytest's capture
    logging.getLogger("ray.serve").addHandler(handler)
    try:
        status, headers, raw = asgi_call(app, "POST", "/v1/generate", json.dumps({"prompt": "x"}).encode(), auth)
    finally:
        logging.getLogger("ray.serve").removeHandler(handler)
    err = json.loads(raw)
    assert status == 500 and headers["content-type"] == "application/json"
    assert set(err) == {"error", "request_id"} and err["request_id"] in err["error"]
    assert "secret" not in raw.decode() and "RuntimeError" not in raw.decode()
    record = next(r for r in records if err["request_id"] in r.getMessage())
    assert record.exc_info and "secret detail" in str(record.exc_info[1])
    assert seen[-1][0] == 500
    status, _, raw = asgi_call(app, "POST", "/v1/generate", json.dumps({"prompt": "x"}).encode(),
                               {**auth, "X-Request-Id": "abc123"})
    assert status == 500 and json.loads(raw)["request_id"] == "abc123"  # the caller's id, when it sends one


def test_rendering_runs_off_the_event_loop(local_service, monkeypatch):
    """The WAV is normalised and encoded by the scheduler's loop thread (the one torch thread), not by the
    thread running the event loop; the bearer dependency guards the route."""
    import threading

    from magnet_engine.serve.http import Service

    service, app, _ = local_service
    threads: list[str] = []
    render = Service.render

    def recorded(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return render(self, *args, **kwargs)

    monkeypatch.setattr(Service, "render", recorded)
    body = json.dumps({"prompt": "x", "seed": 1, **FAST}).encode()
    status, headers, wav = asgi_call(app, "POST", "/v1/generate", body, {"Authorization": f"Bearer {KEY}"})
    assert status == 200 and headers["content-type"] == "audio/wav" and wav[:4] == b"RIFF"
    assert threads == ["magnet-scheduler"]
    for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        status, headers, raw = asgi_call(app, "POST", "/v1/generate", body, auth)
        assert status == 401 and headers["www-authenticate"] == "Bearer" and "API key" in json.loads(raw)["error"]


def test_openapi_request_schema_is_generated_from_generation_config(local_service):
    """The body schema is the pydantic model generated from GenerationConfig's rules: every field an HTTP request can
    use typed, with the model's default, unknown keys refused, and the bearer scheme declared (the service has a
    key). tests/test_serve_openapi.py checks the document against the server with Schemathesis."""
    from magnet_engine.engine.config import GenerationConfig

    service, app, _ = local_service
    doc = app.openapi()
    schema = doc["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["properties"]) == {f.name for f in fields(GenerationConfig)} - {"rescore_weight", "ar_cfg"} | {
        "prompt", "format", "timeout", "stream"}
    assert schema["required"] == ["prompt"] and schema["additionalProperties"] is False
    assert schema["properties"]["steps"]["default"] == list(service.engine.defaults.steps)
    assert schema["properties"]["steps"]["type"] == "array" and schema["properties"]["greedy"]["type"] == "boolean"
    assert schema["properties"]["format"]["enum"] == ["wav", "flac", "ogg"]
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_deterministic_flag_reaches_the_replicas_engine(fixture_dir: Path, local_service) -> None:
    """`magnet serve --deterministic / --no-deterministic` (ServiceConfig.deterministic) reach the replica's engine;
    without either it has the device's default (on on CPU: `engine.config.deterministic_by_default`)."""
    from magnet_engine.serve.cli import parse
    from magnet_engine.serve.config import ServiceConfig
    from magnet_engine.serve.http import Service

    assert parse(["--deterministic"])[0].deterministic is True and parse([])[0].deterministic is None
    assert parse(["--no-deterministic"])[0].deterministic is False
    assert local_service[0].engine.deterministic  # no flag, on CPU
    metrics = type("M", (), {"request": lambda self, status, latency: None})()
    off = Service(ServiceConfig(model=str(fixture_dir), device="cpu", deterministic=False), metrics)
    try:
        assert not off.engine.deterministic
    finally:
        off.close()


def test_limit_thread_and_metrics_flags_take_effect(fixture_dir: Path, monkeypatch) -> None:
    """`magnet serve --max-body 200 --max-prompt-chars 12 --threads 1 --metrics-port P`: the replica refuses a body
    over 200 bytes (413) and a prompt over 12 characters (422) and serves one within both; it sets its torch threads
    to 1 as it loads; the port reaches the `ray start` of the head it launches."""
    import io

    import torch
    from magnet_engine.serve import cli as serve_cli
    from magnet_engine.serve.http import Service, build_app

    port = free_port()
    service_cfg, launch = serve_cli.parse(["--model", str(fixture_dir), "--device", "cpu", "--max-body", "200",
                                           "--max-prompt-chars", "12", "--threads", "1", "--metrics-port", str(port)])
    started: list[list[str]] = []

    class Exited:  # a `ray start` (and its watchdog) that stops at once: what is checked is its command line
        returncode, pid = 1, -1

        def __init__(self) -> None:
            self.stderr, self.stdin = io.BytesIO(b"stopped by the test"), io.BytesIO()

        def poll(self) -> int:
            return 1

        def wait(self, timeout: float | None = None) -> int:
            return 1

    monkeypatch.setattr(serve_cli.subprocess, "Popen", lambda cmd, **kw: started.append(cmd) or Exited())
    with pytest.raises(RuntimeError, match="stopped by the test"):
        serve_cli.LocalHead.start(launch)
    assert f"--metrics-export-port={port}" in started[0]
    threads: list[int] = []
    set_threads, before = torch.set_num_threads, torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: threads.append(n) or set_threads(n))
    metrics = type("M", (), {"request": lambda self, status, latency: None})()
    service = Service(service_cfg, metrics)
    try:
        assert threads == [1]
        app, json_type = build_app(service), {"Content-Type": "application/json"}
        status, _, raw = asgi_call(app, "POST", "/v1/generate", json.dumps({"prompt": "x" * 13, **FAST}).encode(),
                                   json_type)
        assert status == 422 and json.loads(raw)["field"] == "prompt" and "at most 12" in json.loads(raw)["error"]
        body = json.dumps({"prompt": "x" * 12, "seed": 1, **FAST}).encode()
        assert asgi_call(app, "POST", "/v1/generate", body, json_type)[0] == 200
        status, _, raw = asgi_call(app, "POST", "/v1/generate", body + b" " * (201 - len(body)), json_type)
        assert status == 413 and "200" in json.loads(raw)["error"]
    finally:
        service.close()
        set_threads(before)


def test_cuda_graph_flag_reaches_the_replicas_loader(fixture_dir: Path) -> None:
    """`magnet serve --cuda-graph` (ServiceConfig.graph) reaches the replica's `load`: on a CPU device the replica
    refuses to start, with the reason, rather than serving without what was asked."""
    from magnet_engine.engine.config import SettingError
    from magnet_engine.serve.cli import parse
    from magnet_engine.serve.config import ServiceConfig
    from magnet_engine.serve.http import Service

    assert parse(["--cuda-graph"])[0].graph is True and parse([])[0].graph is False
    metrics = type("M", (), {"request": lambda self, status, latency: None})()
    with pytest.raises(SettingError, match="needs the torch or triton backend on a CUDA device"):
        Service(ServiceConfig(model=str(fixture_dir), device="cpu", graph=True), metrics)
