"""`python -m magnet_engine.bench serve --url URL (--rate R | --concurrency C) --seconds S`: load on a running
`magnet serve`.

    open loop    --rate R: Poisson arrivals at R requests/s, drawn up front (a slow server does not slow them)
    closed loop  --concurrency C: C clients, each sends its next request when the previous one is answered

Every request is answered (audio, or an error status) or fails to connect ("conn"); after --seconds no new request
is sent and those in flight get up to --drain s. Output: one JSON line (throughput, latency percentiles of the
answered-with-audio requests, errors by status, per-second series), a Markdown table, and with --plot a PNG of
latency over time by status and answers per second. --kill-at T SIGKILLs one model replica's process on this machine
at T s (by its pid, as an OOM killer or a crash would) and reports the statuses answered before and after it, the
answers the ingress retried on a survivor (X-Retries), and the recovery: from the kill to the first audio answer to
a request sent after it. Once a second a sampler reads the replicas' queue (`GET /v1/health`: waiting, decoding)
and the resident memory of this machine's Serve replica processes (/proc), reported as their ranges ("nothing lost,
memory flat" under overload). --beside-stream S sends one streamed request of S s of audio ("stream": true) at the
start, beside the load, and reports its time to the first audio and to its end (the load's latencies with and
without it: two runs). Loopback only: the URL must name 127.0.0.1, ::1 or localhost.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from magnet_engine.engine.cli import SPELLING
from magnet_engine.serve.config import MODEL_DEPLOYMENT

TEXTS = ["upbeat electronic dance track with a heavy bass line", "slow sad piano", "a calm ambient pad",
         "rock drums and distorted guitar", "jazz trio, walking bass, brushes", "lofi hip hop beat"]
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass
class Shot:
    sent: float  # seconds after the start
    status: int | str  # HTTP status, or "conn" when no answer came
    latency: float  # seconds until answered (or failed)
    bytes: int = 0
    retries: int = 0  # X-Retries: calls the ingress sent again after a model replica died


def send(url: str, body: dict[str, Any], key: str | None, timeout: float, t0: float) -> Shot:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(url + "/v1/generate", json.dumps(body).encode(), headers, method="POST")
    sent = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            n = len(r.read())
            return Shot(sent - t0, r.status, time.perf_counter() - sent, n, int(r.headers.get("X-Retries", 0)))
    except urllib.error.HTTPError as e:
        e.read()
        return Shot(sent - t0, e.code, time.perf_counter() - sent)
    except (urllib.error.URLError, OSError):  # refused, reset, timed out: no HTTP answer
        return Shot(sent - t0, "conn", time.perf_counter() - sent)


def request_body(i: int, args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": TEXTS[i % len(TEXTS)], "seed": i, "duration": args.duration}
    if args.steps:
        body["steps"] = [int(x) for x in args.steps.split(",")]
    if args.timeout is not None:
        body["timeout"] = args.timeout
    return body


def open_loop(args: argparse.Namespace, key: str | None, t0: float) -> list[Shot]:
    rng = random.Random(args.trace_seed)
    arrivals, t = [], rng.expovariate(args.rate)
    while t < args.seconds:
        arrivals.append(t)
        t += rng.expovariate(args.rate)
    shots: list[Shot] = []
    with ThreadPoolExecutor(args.max_clients) as pool:
        futures = []
        for i, at in enumerate(arrivals):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(send, args.url, request_body(i, args), key, args.drain + args.seconds, t0))
        shots = [f.result() for f in futures]
    return shots


def closed_loop(args: argparse.Namespace, key: str | None, t0: float) -> list[Shot]:
    shots: list[Shot] = []
    lock = threading.Lock()
    counter = iter(range(10**9))

    def client() -> None:
        while time.perf_counter() - t0 < args.seconds:
            with lock:
                i = next(counter)
            shot = send(args.url, request_body(i, args), key, args.drain + args.seconds, t0)
            with lock:
                shots.append(shot)

    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sorted(shots, key=lambda s: s.sent)


def stream_beside(args: argparse.Namespace, key: str | None, t0: float, box: dict[str, Any]) -> None:
    """One streamed request of args.beside_stream s of audio, read as it comes: box["stream"] gets its status,
    bytes, time to the first audio (past the 44-byte WAV header) and to its end, in s after it was sent."""
    body = {"prompt": "a long calm ambient piece with soft strings", "seed": 0, "duration": args.beside_stream,
            "stream": True} | {k: v for k, v in request_body(0, args).items() if k in ("steps", "timeout")}
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(args.url + "/v1/generate", json.dumps(body).encode(), headers, method="POST")
    sent = time.perf_counter()
    out: dict[str, Any] = {"duration_s": args.beside_stream, "sent_s": round(sent - t0, 3), "first_audio_s": None}
    n = 0
    try:
        with urllib.request.urlopen(req, timeout=args.drain + args.seconds) as r:
            out["status"] = r.status
            while chunk := r.read1(1 << 16):
                n += len(chunk)
                if n > 44 and out["first_audio_s"] is None:
                    out["first_audio_s"] = round(time.perf_counter() - sent, 3)
    except urllib.error.HTTPError as e:
        out["status"] = e.code
    except (urllib.error.URLError, OSError):
        out["status"] = "conn"
    out |= {"bytes": n, "total_s": round(time.perf_counter() - sent, 3)}
    box["stream"] = out


REPLICA_TITLE = "ray::ServeReplica:"  # then APP:DEPLOYMENT[.METHOD]


def replica_pids(deployment: str | None = None, app: str | None = None) -> list[int]:
    """This machine's Serve replica processes (titled `ray::ServeReplica:APP:DEPLOYMENT`): all, or those of one
    deployment (of one application)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].split(b" ")[0].decode(errors="replace")
        except OSError:
            continue
        if not title.startswith(REPLICA_TITLE):
            continue
        app_name, _, name = title[len(REPLICA_TITLE):].partition(":")
        name = name.partition(".")[0]  # while it runs a call the title names the method: ...:Model.handle_request
        if deployment in (None, name) and app in (None, app_name):
            pids.append(int(proc.name))
    return sorted(pids)


def kill_replica(after: float, t0: float, box: dict[str, Any]) -> None:
    """At `after` s: SIGKILL one model replica's process (Serve's controller then starts a new one)."""
    import os
    import signal

    time.sleep(max(0.0, t0 + after - time.perf_counter()))
    pids = replica_pids(MODEL_DEPLOYMENT)
    if not pids:
        box["kill_error"] = f"no {MODEL_DEPLOYMENT} replica process on this machine"
        return
    os.kill(pids[0], signal.SIGKILL)
    box["killed_at"] = time.perf_counter() - t0


def replica_rss_mb() -> float:
    """Resident memory of this machine's Serve replica processes (`ray::ServeReplica...`), MB."""
    total = 0
    for pid in replica_pids():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return round(total / 1024, 1)


def sample(url: str, stop: threading.Event, out: list[dict[str, Any]], t0: float) -> None:
    """Once a second until `stop`: the health endpoint's queue counts and the replicas' memory."""
    while not stop.wait(1.0):
        point: dict[str, Any] = {"t": round(time.perf_counter() - t0, 1), "rss_mb": replica_rss_mb()}
        try:
            with urllib.request.urlopen(url + "/v1/health", timeout=2) as r:
                point |= {k: v for k, v in json.loads(r.read()).items() if k in ("waiting", "decoding")}
        except (urllib.error.URLError, OSError, ValueError):
            pass
        out.append(point)


def summarize(args: argparse.Namespace, shots: list[Shot], killed_at: float | None,
              samples: Sequence[dict[str, Any]] = (), stream: dict[str, Any] | None = None) -> dict[str, Any]:
    from magnet_engine.bench.common import cpu_model, git_sha, percentile

    ok = [s for s in shots if s.status == 200]
    end = max((s.sent + s.latency for s in shots), default=0.0)
    statuses = collections.Counter(str(s.status) for s in shots)
    per_second: dict[str, list[int]] = collections.defaultdict(lambda: [0] * (int(end) + 1))
    for s in shots:  # answers per second, by status, at the second they came back
        per_second[str(s.status)][int(s.sent + s.latency)] += 1
    lat = [s.latency for s in ok]
    row: dict[str, Any] = {
        "bench": "serve", "mode": "open" if args.rate else "closed", "rate": args.rate,
        "concurrency": args.concurrency, "seconds": args.seconds, "duration_s": args.duration, "steps": args.steps,
        "requests": len(shots), "statuses": dict(sorted(statuses.items())),
        "throughput_rps": round(len(ok) / args.seconds, 3) if args.seconds else None,
        "audio_s_per_s": round(len(ok) * args.duration / args.seconds, 3) if args.seconds else None,
        "latency_s": {f"p{q}": round(percentile(lat, q), 3) for q in (50, 90, 95, 99)} if lat else None,
        "latency_all_s": {f"p{q}": round(percentile([s.latency for s in shots], q), 3) for q in (50, 99)}
        if shots else None,
        "per_second": dict(per_second), "label": args.label, "cpu": cpu_model(), "git": git_sha(),
    }
    if samples:
        waiting = [p["waiting"] for p in samples if "waiting" in p]
        rss = [p["rss_mb"] for p in samples if p["rss_mb"]]
        row["max_waiting"] = max(waiting, default=None)
        row["replica_rss_mb"] = [min(rss), max(rss)] if rss else None
        row["samples"] = list(samples)
    if killed_at is not None:
        row["killed_at_s"] = round(killed_at, 2)
        after = [s for s in ok if s.sent >= killed_at]
        row["recovery_s"] = round(min(s.sent + s.latency for s in after) - killed_at, 2) if after else None
        row["failed_after_kill"] = sum(1 for s in shots if s.status != 200 and s.sent + s.latency >= killed_at)
        for name, side in (("before", lambda s: s.sent + s.latency < killed_at),
                           ("after", lambda s: s.sent + s.latency >= killed_at)):  # by when they were answered
            row[f"statuses_{name}_kill"] = dict(sorted(collections.Counter(str(s.status) for s in shots
                                                                          if side(s)).items()))
        row["retried"] = sum(1 for s in shots if s.retries)
    if stream is not None:  # did the stream run beside the whole load, or end before the last request was sent
        last = max((s.sent for s in shots), default=0.0)
        row["beside_stream"] = stream | {"covered_load": stream["sent_s"] + stream["total_s"] >= last}
    if args.raw:
        row["shots"] = [asdict(s) for s in shots]
    return row


def table(row: dict[str, Any]) -> str:
    lat = row["latency_s"] or {}
    load = f"{row['rate']} req/s open" if row["mode"] == "open" else f"{row['concurrency']} clients closed"
    lines = ["| load | requests | by status | throughput (req/s) | latency p50 / p95 / p99 (s) |",
             "|---|---|---|---|---|",
             f"| {load} | {row['requests']} | {', '.join(f'{k}: {v}' for k, v in row['statuses'].items())} | "
             f"{row['throughput_rps']} | {lat.get('p50')} / {lat.get('p95')} / {lat.get('p99')} |"]
    if "beside_stream" in row:
        st = row["beside_stream"]
        lines.append(f"\nbeside it: a {st['duration_s']} s stream, status {st['status']}, first audio after "
                     f"{st['first_audio_s']} s, done after {st['total_s']} s (ran beside all the load: "
                     f"{st['covered_load']})")
    if "recovery_s" in row:
        lines.append(f"\nreplica killed at {row['killed_at_s']} s: recovered in {row['recovery_s']} s, "
                     f"{row['failed_after_kill']} requests failed after the kill; by status before "
                     f"{row['statuses_before_kill']}, after {row['statuses_after_kill']}; {row['retried']} answered "
                     "after a retry on a survivor")
    return "\n".join(lines)


def plot(shots: list[Shot], row: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for status in sorted({str(s.status) for s in shots}):
        pts = [s for s in shots if str(s.status) == status]
        ax1.scatter([s.sent for s in pts], [s.latency for s in pts], s=8, label=status)
    ax1.set_ylabel("latency (s)")
    ax1.legend(title="status")
    for status, counts in sorted(row["per_second"].items()):
        ax2.plot(range(len(counts)), counts, label=status)
    if row.get("killed_at_s") is not None:
        for ax in (ax1, ax2):
            ax.axvline(row["killed_at_s"], color="k", linestyle="--")
    ax2.set_xlabel("time (s)")
    ax2.set_ylabel("answers per second")
    fig.suptitle(f"bench serve: {row['mode']} loop, {row['label'] or ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m magnet_engine.bench serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8000 (loopback only)")
    load = ap.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    load.add_argument("--concurrency", type=int, help="closed loop: clients")
    ap.add_argument("--seconds", type=float, default=30.0, help="how long requests are sent")
    ap.add_argument("--drain", type=float, default=120.0, help="seconds in-flight requests get after that")
    ap.add_argument("--duration", type=float, default=1.0, help="audio seconds per request")
    ap.add_argument("--steps", default=None, help="decoding steps per request, e.g. 1,4,4,4 (default: the model's)")
    ap.add_argument("--timeout", type=float, default=None, help="the requests' deadline (default: the server's)")
    ap.add_argument("--api-key-file", type=Path, default=None)
    ap.add_argument("--max-clients", type=int, default=256, help="open loop: most requests in flight")
    ap.add_argument("--trace-seed", type=int, default=0)
    ap.add_argument("--kill-at", type=float, default=None,
                    help="SIGKILL a model replica's process (on this machine) this many seconds in")
    ap.add_argument("--beside-stream", type=float, default=None, metavar="SECONDS",
                    help="also send one streamed request of this many seconds of audio at the start")
    ap.add_argument("--label", default="")
    ap.add_argument(*SPELLING["output"], dest="out", type=Path, default=None, help="append the JSON line here")
    ap.add_argument("--plot", type=Path, default=None, help="write a PNG here")
    ap.add_argument("--raw", action="store_true", help="keep every request in the JSON line")
    args = ap.parse_args(argv)
    if urllib.parse.urlsplit(args.url).hostname not in LOOPBACK:
        ap.error(f"--url must be on loopback ({', '.join(LOOPBACK)}), got {args.url}")
    if (args.rate is not None and not args.rate > 0) or (args.concurrency is not None and args.concurrency < 1):
        ap.error("--rate must be > 0 and --concurrency >= 1")
    if args.beside_stream is not None and not args.beside_stream > 0:
        ap.error(f"--beside-stream takes seconds of audio > 0, got {args.beside_stream}")
    args.url = args.url.rstrip("/")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    key = args.api_key_file.read_text().strip() if args.api_key_file else None
    t0 = time.perf_counter()
    box: dict[str, Any] = {}
    killer = None
    if args.kill_at is not None:
        killer = threading.Thread(target=kill_replica, args=(args.kill_at, t0, box), daemon=True)
        killer.start()
    samples: list[dict[str, Any]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(args.url, stop, samples, t0), daemon=True)
    sampler.start()
    streamer = None
    if args.beside_stream is not None:
        streamer = threading.Thread(target=stream_beside, args=(args, key, t0, box), daemon=True)
        streamer.start()
    try:
        shots = open_loop(args, key, t0) if args.rate else closed_loop(args, key, t0)
    finally:
        stop.set()
        sampler.join(timeout=5)
    if killer is not None:
        killer.join(timeout=5)
    if streamer is not None:
        streamer.join(timeout=args.drain)
    if "kill_error" in box:
        print(f"bench serve: --kill-at: {box['kill_error']}", file=sys.stderr)
        return 1
    row = summarize(args, shots, box.get("killed_at"), samples, box.get("stream"))
    line = json.dumps(row)
    print(line, flush=True)
    if args.out is not None:
        with args.out.open("a") as f:
            f.write(line + "\n")
    print(table(row), file=sys.stderr)
    if args.plot is not None:
        plot(shots, row, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
