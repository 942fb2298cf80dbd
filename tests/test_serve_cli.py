"""`magnet serve` as a process: flags checked before anything starts, found by `magnet` through its entry point, a
burst of max_batch requests admitted whole, and SIGTERM to its whole process group (as a supervisor sends it): in-flight
requests answered, exit 0, every process it started gone, and nothing ever listening off loopback.
One Ray start (the subprocess's)."""
from __future__ import annotations

import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv, flag", [
    (["--max-batch", "0"], "--max-batch"),
    (["--replicas", "2", "--autoscale", "1,2"], "--replicas"),
    (["--autoscale", "3,1"], "--autoscale"),
    (["--port", "70000"], "--port"),
    (["--timeout", "nan"], "--timeout"),
    (["--api-key-file", "/nonexistent/key"], "--api-key-file"),
])
def test_bad_flags_one_line_before_anything_starts(argv, flag, capsys):
    from magnet_engine.serve.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("magnet serve: error:") and flag in err and "\n" not in err


def test_help_lists_every_flag(capsys):
    """`magnet serve --help` renders (argparse formats help texts with %: a bare one broke it) and names every flag."""
    from magnet_engine.serve.cli import FLAGS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert [flag for flag, _ in FLAGS.values() if flag not in out] == []


def test_magnet_finds_serve_through_its_entry_point(monkeypatch, capsys):
    """engine.cli imports nothing of serve: it finds the subcommand in the magnet_engine.commands group (setup.py)."""
    from magnet_engine.engine import cli

    real = importlib.metadata.entry_points
    ep = importlib.metadata.EntryPoint(name="serve", value="magnet_engine.serve.cli:main", group=cli.COMMANDS_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: [ep] if kw.get("group") == cli.COMMANDS_GROUP else real(**kw))
    assert cli.main(["--help"]) == 0 and "serve" in capsys.readouterr().out
    assert cli.main(["serve", "--max-queue", "-1"]) == 2 and "--max-queue" in capsys.readouterr().err
    assert "serve = magnet_engine.serve.cli:main" in (REPO / "setup.py").read_text()


def _tree(root: int) -> set[int]:
    """root and every process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo += children.get(pid, [])
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _listening(pids: set[int]) -> list[tuple[str, int]]:
    """(hex address as /proc/net shows it, pid) of every listening TCP socket the processes hold."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes[link[8:-1]] = pid
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                out.append((cols[1].split(":")[0], inodes[cols[9]]))
    return out


def _loopback(addr: str) -> bool:
    # /proc/net/tcp: IPv4 as little-endian hex (127.x.x.x ends in 7F); tcp6: ::1 or ::ffff:127.x.x.x
    return (len(addr) == 8 and addr.endswith("7F")) or addr == "0" * 24 + "01000000" or \
        (addr.startswith("0000000000000000FFFF0000") and addr.endswith("7F"))


def test_sigterm_to_the_group_finishes_in_flight_and_leaves_nothing_running(fixture_dir, tmp_path):
    import secrets
    from concurrent.futures import ThreadPoolExecutor

    from magnet_engine.serve.client import Client

    (tmp_path / "key").write_text("k3y\n")
    port = free_port()
    out, err = (tmp_path / "out.log").open("w"), (tmp_path / "err.log").open("w")
    # a user who has a Ray token (ray.init() leaves one in ~/.ray): the head turns token auth on, and magnet serve's
    # own connection to it must too
    (tmp_path / "ray_token").write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")} | {
        "RAY_AUTH_TOKEN_PATH": str(tmp_path / "ray_token")}
    # a session of its own, as a supervisor starts a service: the group's SIGTERM below does not reach this test
    proc = subprocess.Popen([sys.executable, "-m", "magnet_engine.serve", "--model", str(fixture_dir),
                             "--device", "cpu", "--port", str(port), "--api-key-file", str(tmp_path / "key"),
                             "--max-batch", "4", "--max-queue", "0", "--timeout", "60"],
                            stdout=out, stderr=err, cwd=REPO, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 150
        while "ready at" not in (tmp_path / "out.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "err.log").read_text()[-3000:]
            time.sleep(0.5)
        assert f"http://127.0.0.1:{port}" in (tmp_path / "out.log").read_text()
        started = _tree(proc.pid)
        assert len(started) > 3  # Ray's own processes: gcs_server, raylet, workers
        sockets = _listening(started)
        assert sockets and all(_loopback(addr) for addr, _ in sockets), sockets
        client = Client(f"http://127.0.0.1:{port}", api_key="k3y")
        assert client.health()["status"] == "ok"
        assert client.generate("metrics", seed=0, steps=[2, 1, 1, 1])[1] == 32000
        # Prometheus: Ray Serve's own metrics and the replica's, at the address it printed (exported every few s)
        metrics_url = next(w for w in (tmp_path / "out.log").read_text().split() if w.endswith("/metrics"))
        names = ("ray_magnet_request_latency_s_bucket", "ray_magnet_batch_size_bucket", "ray_magnet_queue_length",
                 "ray_serve_num_http_requests")
        deadline, text = time.monotonic() + 60, ""
        while not all(n in text for n in names) and time.monotonic() < deadline:
            time.sleep(2)
            text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        assert all(n in text for n in names), [n for n in names if n not in text]
        # admission: a burst of max_batch requests into the idle replica is taken whole, even with --max-queue 0
        with ThreadPoolExecutor(4) as pool:
            burst = list(pool.map(lambda i: client.generate("burst", seed=i, steps=[40, 10, 10, 10])[1], range(4)))
        assert burst == [32000] * 4
        result: dict = {}

        def slow() -> None:
            result["audio"] = client.generate("in flight", steps=[150, 50, 50, 50], seed=1)

        worker = threading.Thread(target=slow)
        worker.start()
        time.sleep(0.5)
        started |= _tree(proc.pid)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)  # systemd's way: every process of the group, not only the main one
        assert proc.wait(timeout=90) == 0, (tmp_path / "err.log").read_text()[-3000:]
        assert time.monotonic() - t0 < 60  # within the grace period (--timeout)
        worker.join(timeout=60)
        assert result["audio"][1] == 32000  # the request in flight was answered, not dropped
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [p for p in started if _alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
        err.close()


def test_deployment_options_replicas_and_autoscaling():
    """Two deployments: the ingress (one replica, no CPU, bounded) holding a handle to the model; the model with
    --replicas N (a fixed count) or --autoscale MIN,MAX (Serve's autoscaler aiming at max_batch ongoing requests per
    replica: a replica is full at max_batch decoding together); model replicas hold their scheduler's queue plus room
    to answer overflow with 503, and the handle's queue is bounded."""
    from magnet_engine.serve.cli import parse
    from magnet_engine.serve.config import scheduler_limits
    from magnet_engine.serve.deployment import OVERFLOW, Gateway, Model, application

    service, launch = parse(["--max-batch", "4", "--max-queue", "10", "--autoscale", "1,3", "--replica-cpus", "2"])
    ingress = application(service, launch)
    model = ingress._bound_deployment.init_args[1]
    assert ingress._bound_deployment.func_or_class is Gateway and model._bound_deployment.func_or_class is Model
    opts = model._bound_deployment._deployment_config
    auto = opts.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 3, 4)
    per_replica = 4 + 10 + scheduler_limits(service)["max_streams"] + OVERFLOW  # the scheduler's default streams
    assert opts.max_ongoing_requests == opts.max_queued_requests == per_replica
    front = ingress._bound_deployment
    assert front.ray_actor_options["num_cpus"] == 0 and front._deployment_config.num_replicas == 1
    assert front._deployment_config.max_queued_requests == 2 * per_replica * 3  # what 3 model replicas hold, twice
    service, launch = parse(["--replicas", "3"])
    bound = application(service, launch)._bound_deployment.init_args[1]._bound_deployment
    assert bound._deployment_config.num_replicas == 3 and bound._deployment_config.autoscaling_config is None
    assert bound.ray_actor_options["num_cpus"] == 1.0 and bound.init_args[0].threads == 1


def test_magnet_help_imports_neither_serve_nor_ray():
    """The entry point is read as metadata: `magnet --help` lists plug-in commands without importing them."""
    code = ("import sys, contextlib, io; from magnet_engine.engine.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()): main(['--help'])\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('ray', 'fastapi') or\n"
            "            m.startswith('magnet_engine.serve')], 'imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _family(root: int) -> set[int]:
    """root's process tree and every process in the sessions of its members (Ray's head runs in a session of its
    own; a process reparented to init stays in its session): what a stop must leave nothing of, by pid."""
    tree = _tree(root)
    sessions: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            sessions[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[3])
        except (OSError, ValueError):
            continue
    theirs = {sessions[p] for p in tree if p in sessions} - {os.getsid(0)}
    return tree | {p for p, sid in sessions.items() if sid in theirs}


def _serve(fixture_dir: Path, tmp_path: Path, port: int) -> subprocess.Popen:
    """`magnet serve` in a session of its own, as a supervisor starts it; logs in tmp_path/{out,err}.log."""
    with (tmp_path / "out.log").open("w") as out, (tmp_path / "err.log").open("w") as err:
        return subprocess.Popen([sys.executable, "-m", "magnet_engine.serve", "--model", str(fixture_dir),
                                 "--device", "cpu", "--port", str(port), "--timeout", "30"],
                                stdout=out, stderr=err, cwd=REPO, start_new_session=True)


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.mark.parametrize("how", ["process", "group", "sigkill"])
def test_stopped_during_start_up_leaves_nothing_running(fixture_dir, tmp_path, how):
    """SIGTERM as soon as /v1/health answers, before `ready` is printed (a supervisor's restart, a readiness probe
    that gives up), to the process or its group: exit 0 saying start-up was cut short. SIGKILL: the Ray head gets
    its parent-death signal. Either way nothing of what it started is left running. Ray binds loopback only."""
    port = free_port()
    proc = _serve(fixture_dir, tmp_path, port)
    try:
        deadline = time.monotonic() + 150
        while not _answers(port):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "err.log").read_text()[-3000:]
            time.sleep(0.02)
        started = _family(proc.pid)
        (os.killpg if how == "group" else os.kill)(proc.pid, signal.SIGKILL if how == "sigkill" else signal.SIGTERM)
        ready = "ready at" in (tmp_path / "out.log").read_text()
        assert len(started) > 3  # Ray's own processes: gcs_server, raylet, workers
        sockets = _listening(started)
        assert sockets and all(_loopback(addr) for addr, _ in sockets), sockets
        assert proc.wait(timeout=90) == (-signal.SIGKILL if how == "sigkill" else 0), \
            (tmp_path / "err.log").read_text()[-3000:]
        err = (tmp_path / "err.log").read_text()
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [p for p in started if _alive(p)]
        assert how == "sigkill" or ready or "start-up cut short by SIGTERM" in err, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
