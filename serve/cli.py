"""`magnet serve`: the HTTP service on Ray Serve (registered with `magnet` through the entry-point group
magnet_engine.commands; `python -m magnet_engine.serve` runs the same).

Without --address it starts a local Ray head pinned to 127.0.0.1 (`ray start --head --block`: no dashboard, no usage
statistics) in a session of its own, and stops it on exit; with --address it deploys onto that cluster and removes
only its own application on exit. SIGINT / SIGTERM: Serve stops routing, each replica finishes (or times out) what it
holds, then Serve and the Ray it started shut down, and the process exits 0. The handlers are installed before
anything starts: a signal during start-up stops what had started and exits 0 saying start-up was cut short. The
local Ray head cannot outlive this process, even SIGKILLed: a watchdog (serve/watchdog.py) kills the head's session
when this process dies without having stopped it, and the head gets a parent-death signal too (Linux).

Ray's processes run in their own session so that a supervisor's SIGTERM to this process group (a terminal's Ctrl-C,
`kill -TERM -PGID`) reaches only this process, which drains and then stops Ray; otherwise the raylet and the
replicas would die at once under the requests in flight. Under systemd use KillMode=mixed (SIGTERM to the main
process, SIGKILL to what is left after it exits): the default control-group mode signals every process of the unit.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NoReturn

from magnet_engine.engine.config import SettingError

from .config import LaunchConfig, ServiceConfig, key_digest

LOOPBACK = "127.0.0.1"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StartupCancelled(BaseException):
    """Raised by `magnet serve`'s signal handler while the service starts: what start() began is stopped again.
    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it."""


def _pair(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (two integers), got {text!r}") from e
    return lo, hi


# ServiceConfig / LaunchConfig field -> (flag, argparse keywords); defaults come from the dataclasses.
FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "model": ("--model", {"help": "default (the shipped model), a model folder or a Hugging Face id"}),
    "device": ("--device", {"help": "cpu, cuda or cuda:N (default: cuda when available)"}),
    "max_batch": ("--max-batch", {"type": int, "help": "requests decoded together per replica (default: the "
                                                         "scheduler's)"}),
    "max_queue": ("--max-queue", {"type": int, "help": "requests waiting per replica; past it: 503 (default: "
                                                         "the scheduler's)"}),
    "max_streams": ("--max-streams", {"type": int, "help": "streamed requests (\"stream\": true or past the "
                                                             "segment) per replica; past it: 503 (default: the "
                                                             "scheduler's)"}),
    "timeout": ("--timeout", {"type": float, "help": "seconds: a request's deadline unless it sends one; then 504"}),
    "max_body": ("--max-body", {"type": int, "help": "bytes of a request body; past it: 413"}),
    "max_prompt_chars": ("--max-prompt-chars", {"type": int, "help": "longest prompt in characters"}),
    "threads": ("--threads", {"type": int, "help": "torch threads per replica (0 = its --replica-cpus)"}),
    "deterministic": ("--deterministic", {"action": argparse.BooleanOptionalAction,
                                          "help": "a request's tokens are its solo run's whatever its batchmates "
                                                  "(default: on on CPU, where it costs ~8%% of a request; off on "
                                                  "CUDA)"}),
    "graph": ("--cuda-graph", {"action": "store_const", "const": True,
                               "help": "replay the LM pass as a CUDA graph per batch layout (CUDA devices only)"}),
    "host": ("--host", {"help": "HTTP address to bind; anything but loopback exposes the service"}),
    "port": ("--port", {"type": int}),
    "replicas": ("--replicas", {"type": int, "help": "fixed number of replicas, placed across the Ray nodes"}),
    "autoscale": ("--autoscale", {"type": _pair, "metavar": "MIN,MAX",
                                  "help": "autoscale between MIN and MAX replicas (target: max-batch ongoing "
                                          "requests per replica)"}),
    "address": ("--address", {"metavar": "RAY_ADDRESS", "help": "an existing Ray cluster (default: start one here)"}),
    "replica_cpus": ("--replica-cpus", {"type": float, "help": "Ray CPUs reserved per replica"}),
    "replica_gpus": ("--replica-gpus", {"type": float, "help": "Ray GPUs reserved per replica (e.g. 1 with "
                                                              "--device cuda)"}),
    "metrics_port": ("--metrics-port", {"type": int, "help": "Ray's Prometheus metrics port (default: Ray picks)"}),
}
FLAG_NAMES = {name: flag for name, (flag, _) in FLAGS.items()} | {"api_key_file": "--api-key-file"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"magnet serve: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="magnet serve", description="Serve text-to-audio over HTTP on Ray Serve (JSON in, audio out).")
    for config in (ServiceConfig, LaunchConfig):
        for f in fields(config):
            if f.name not in FLAGS:
                continue
            flag, kw = FLAGS[f.name]
            if f.default is not None:  # None defaults are explained by the flag's help
                kw = dict(kw, help=f"{kw.get('help', '')} (default: {f.default})".strip())
            p.add_argument(flag, dest=f.name, default=None, **kw)
    p.add_argument("--api-key-file", type=Path, help="file holding the API key: clients send Authorization: "
                   "Bearer KEY (default: no key)")
    return p


def parse(argv: Sequence[str]) -> tuple[ServiceConfig, LaunchConfig]:
    """Flags -> the two configs, checked (before Ray or a model is touched)."""
    args = build_parser().parse_args(list(argv))
    if args.replicas is not None and args.autoscale is not None:
        raise SettingError("give <replicas> or <autoscale>, not both")
    given = {name: getattr(args, name) for name in FLAGS if getattr(args, name) is not None}
    service = {k: v for k, v in given.items() if k in {f.name for f in fields(ServiceConfig)}}
    if args.api_key_file is not None:
        try:
            key = args.api_key_file.read_text().strip()
        except OSError as e:
            raise SettingError(f"cannot read <api_key_file> {args.api_key_file}: {e.strerror}") from None
        if not key:
            raise SettingError(f"<api_key_file> {args.api_key_file} is empty; write the key in it")
        service["api_key_sha256"] = key_digest(key)
    return ServiceConfig(**service), LaunchConfig(**{k: v for k, v in given.items() if k not in service})


@dataclass
class Running:
    """A started service: where it answers and whether this process owns the Ray it runs on."""

    url: str
    app_name: str
    owns_ray: bool
    head: LocalHead | None = None  # the Ray head started here

    def stop(self) -> None:
        """Delete the application (its replicas drain first); with a Ray of our own, shut Serve and Ray down too."""
        import ray
        from ray import serve

        try:
            serve.delete(self.app_name)  # replicas finish what they hold while the proxy still answers
            if self.owns_ray:
                serve.shutdown()
        finally:
            if self.owns_ray:
                ray.shutdown()
                if self.head is not None:
                    self.head.stop()


@dataclass
class LocalHead:
    """`ray start --head --block` in a session of its own (module docstring), on loopback; stopped by its pid."""

    process: subprocess.Popen
    address: str  # GCS host:port
    watchdog: subprocess.Popen | None = None  # kills the head's session if this process dies first

    @classmethod
    def start(cls, launch: LaunchConfig, timeout_s: float = 120.0) -> LocalHead:
        ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
        if ray_cli is None:
            raise RuntimeError("the `ray` command is not installed beside this Python; pip install -e \".[serve]\"")
        with socket.socket() as s:  # a free port for the GCS (another Ray on this machine may hold Ray's default)
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
        cmd = [ray_cli, "start", "--head", "--block", f"--node-ip-address={LOOPBACK}", f"--port={port}",
               "--include-dashboard=false", "--disable-usage-stats"]
        if launch.metrics_port is not None:
            cmd.append(f"--metrics-export-port={launch.metrics_port}")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True, preexec_fn=die_with_parent())
        head = cls(proc, f"{LOOPBACK}:{port}")
        try:
            head.watchdog = subprocess.Popen([sys.executable, "-I", str(Path(__file__).with_name("watchdog.py")),
                                              str(proc.pid)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                             start_new_session=True)
            head._wait_up(port, timeout_s)
        except BaseException:  # a timeout, a failed start or a signal (StartupCancelled): stop what runs
            head.stop()
            raise
        return head

    def _wait_up(self, port: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:  # the GCS answers once the head is up
            if self.process.poll() is not None:
                stderr = self.process.stderr
                err = stderr.read().decode(errors="replace").strip().splitlines() if stderr else []
                raise RuntimeError(f"`ray start` exited with status {self.process.returncode}: "
                                   f"{err[-1] if err else ''}")
            try:
                socket.create_connection((LOOPBACK, port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the local Ray head did not start within {timeout_s:.0f} s") from None
                time.sleep(0.2)

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM to `ray start --block`, which stops the processes it started; SIGKILL to its session if it hangs."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()
        if self.watchdog is not None and self.watchdog.stdin is not None:
            self.watchdog.stdin.write(b"stopped")  # a word before the end of file: nothing to kill
            self.watchdog.stdin.close()
            self.watchdog.wait(timeout_s)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A Popen preexec_fn: the child gets `sig` when this process dies, however it dies (SIGKILL included); for
    `ray start --block`, SIGTERM makes it stop every Ray process it started. Linux only (None elsewhere).
    prctl is looked up here, before the fork: the child only calls it. The signal is tied to the thread that forks,
    so call Popen from a thread that lives as long as the process (the main thread)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(1)  # no parent-death signal, or the parent died before it was set: do not start at all

    return preexec


@contextlib.contextmanager
def handlers_kept() -> Iterator[None]:
    """ray.init installs a SIGTERM handler of its own (sys.exit from whatever runs; the process then dies by its
    core worker's SIGABRT). Around it: SIGINT/SIGTERM held blocked (the threads it starts inherit the mask, so they
    never take them), the caller's handlers put back, then whatever arrived meanwhile delivered to those."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:  # None: installed from C, not restorable (not ours)
                signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def ray_environment() -> None:
    """Environment for a Ray started here, set before `import ray` (read once there, inherited by its processes):
    - no usage statistics;
    - the node's address is loopback, so Ray's servers bind 127.0.0.1 (on Linux Ray resolves even an explicit
      127.0.0.1 to the machine's routable address; this switch is the one it uses on macOS and Windows);
    - the proxy spreads requests over all replicas instead of preferring those on its own node: a replica's CPUs
      are what a request waits for, so an idle replica on another node beats a busy local one.
    - token authentication on when a Ray token exists (~/.ray/auth_token, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH) and
      RAY_AUTH_MODE says nothing: `ray start --head` turns it on then, but Ray 2.60's client does not for an address
      given to it, so without this the head refuses magnet serve's own connection ("Failed to connect").
    A cluster joined with --address keeps its own settings."""
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING", "0")


def start(service: ServiceConfig, launch: LaunchConfig, app_name: str | None = None,
          route_prefix: str = "/") -> Running:
    """Start (or join) Ray and Serve and deploy the application; returns once every replica is ready. On a failure
    (or a BaseException such as StartupCancelled from a signal handler) what it started is stopped again. The
    caller's SIGINT/SIGTERM handlers are kept (handlers_kept)."""
    ray_environment()
    import ray
    from ray import serve

    from .deployment import APP_NAME, application, check_ray_supported

    check_ray_supported()
    owns, head = False, None
    if not ray.is_initialized():
        if launch.address is not None:
            with handlers_kept():
                ray.init(address=launch.address, log_to_driver=False)
        else:  # Ray's own ports on loopback: the node's address is what its services bind
            head = LocalHead.start(launch)
            try:
                with handlers_kept():
                    ray.init(address=head.address, log_to_driver=False)
            except BaseException:
                try:
                    ray.shutdown()
                finally:
                    head.stop()
                raise
            owns = True
    running = Running(_url(launch.host, launch.port, route_prefix), app_name or APP_NAME, owns, head)
    try:
        # one HTTP proxy, on the head node: on a one-machine test cluster per-node proxies would share one port
        serve.start(proxy_location="HeadOnly", http_options={"host": launch.host, "port": launch.port})
        serve.run(application(service, launch), name=running.app_name, route_prefix=route_prefix)
        _check_serving(running.url)
    except BaseException as e:
        why = _deploy_failure(running.app_name) if isinstance(e, Exception) else None
        try:
            running.stop()
        except Exception as stop_error:  # noqa: BLE001 - the start's own error (or the signal) is what to report
            if isinstance(e, Exception):
                raise
            print(f"magnet serve: while stopping: {stop_error}", file=sys.stderr, flush=True)
        if why:  # the replica's own error (a missing model, ...), not Serve's "failed to update the deployments"
            raise RuntimeError(why) from e
        raise
    return running


def _url(host: str, port: int, route_prefix: str) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{route_prefix.rstrip('/')}"


def _check_serving(url: str, timeout_s: float = 30.0) -> None:
    """The application answers at `url`: on a cluster where Serve already runs (--address), Serve keeps its own
    HTTP address and ignores ours, which would otherwise print a URL nothing answers on."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url + "/v1/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the service does not answer at {url}: on a cluster where Serve already runs, its "
                               "HTTP host and port stay as they were; pass those as --host / --port")
        time.sleep(0.5)


def _deploy_failure(app_name: str) -> str | None:
    """What Serve recorded about a failed deployment: the replica constructor's traceback, last line last."""
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # noqa: BLE001 - best effort: the caller re-raises the original error without it
        return None
    if app is None:
        return None
    messages = [d.message for d in app.deployments.values() if d.message] or [app.message]
    return "\n".join(m for m in messages if m) or None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        service, launch = parse(argv)
    except SettingError as e:
        print(f"magnet serve: error: {e.spelled(FLAG_NAMES)}", file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse: --help or a usage error it printed
        return e.code if isinstance(e.code, int) else 2
    stop = threading.Event()
    starting = True

    def on_signal(signum: int, _frame: Any) -> None:
        first = not stop.is_set()
        stop.set()
        if first and starting:  # interrupt start-up once; start() stops what it began (later signals: no-op)
            raise StartupCancelled(signal.Signals(signum).name)

    for sig in STOP_SIGNALS:  # before anything starts (Ray's import included)
        signal.signal(sig, on_signal)
    running: Running | None = None
    try:
        ray_environment()
        try:
            import ray  # noqa: F401 - the optional dependency, checked before anything starts
        except ImportError:
            print('magnet serve: error: Ray Serve is not installed; pip install -e ".[serve]"', file=sys.stderr)
            return 1
        try:
            running = start(service, launch)
        except Exception as e:  # noqa: BLE001 - a failed start (model, port, cluster): one line, start() cleaned up
            print(f"magnet serve: error: could not start: {str(e).strip().splitlines()[-1] if str(e) else e!r}",
                  file=sys.stderr)
            return 1
        starting = False
    except StartupCancelled as e:
        if running is not None:  # the signal came just after start() returned
            running.stop()
        print(f"magnet serve: start-up cut short by {e}; stopped what had started", file=sys.stderr, flush=True)
        return 0
    if not stop.is_set():
        print(f"magnet serve: ready at {running.url} (POST /v1/generate, GET /v1/health, /docs)", flush=True)
        print(f"magnet serve: Prometheus metrics at {metrics_url()}", flush=True)
    while not stop.wait(0.5):
        pass
    print("magnet serve: stopping", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    running.stop()
    print(f"magnet serve: stopped in {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
    return 0


def metrics_url() -> str:
    """Where this node's Ray exports Prometheus metrics (Ray Serve's and the replicas' magnet_* ones)."""
    import ray

    me = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == me)
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
