"""`python -m magnet_engine.bench overhead`: the host's share of MAGNeT decoding, measured on a CPU, per model.

For one request (batch 1, one prompt, the model's default settings, --duration seconds) it reports:
- ops_per_pass: aten ops dispatched by one LM pass (a TorchDispatchMode counts every op; median over the
  request's passes), and ops_per_step: the whole decoding step's (re-mask, pass, sampler, span scores);
- host_syncs_in_loop: ops that make the host wait for the device (aten._local_scalar_dense = .item(), bool(t),
  nonzero) dispatched by the loop's steps once the program is built (must be 0: a whole program is one CUDA graph);
  tolist_in_loop: Tensor.tolist() calls in the loop, which dispatch no op (a TorchFunctionMode counts them);
- step_ms / pass_ms / rest_ms: wall milliseconds of one decoding step, of its LM pass, and of the rest of the step
  (step - pass: re-masking, sampling, scores), medians over every step of --loops requests, timed eagerly on the
  CPU. On a CPU the device is the host, so these are compute plus dispatch, not dispatch alone: read them with
  the op counts (the host cost per op is a few microseconds);
- compile: torch._dynamo.explain of one decoding step (graphs, graph breaks, their reasons), and the fraction of
  the step's top-level aten ops that ran inside compiled graphs (the profiler, with the graphs' runs marked);
- requests: median wall (and process CPU) seconds of a whole request (text, every step, codec) eager, with the
  decoding step compiled (`compile-step`: torch.compile of `magnet.decode_step`; a stage and step index are host
  facts, so each step of the program is its own graph) and with the LM and the sampler compiled (`compile-pass`:
  one graph per stage), eager with row-invariant linears (`deterministic`: Engine.set_deterministic) or plain ones
  (`plain`), after --warmup requests per variant (their seconds, compilation included, are warmup_s); the timed
  requests go round-robin over the variants.

The measuring functions take any program (`Program`), so the same counts can be taken of other decoding loops.
"""
from __future__ import annotations

import argparse
import contextlib
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .schema import emit

SYNC_OPS = frozenset({"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.item.default"})
GRAPH_MARK = "bench.overhead::compiled_graph"
PROMPT = "80s pop track with bassy drums and synth"
VARIANTS = ("eager", "compile-step", "compile-pass")
# eager with the linears chosen: row-invariant (Engine.set_deterministic) or plain F.linear; what deterministic costs
LINEAR_VARIANTS = ("deterministic", "plain")

Pass = Callable[..., Any]


@dataclass
class Program:
    """One request's decoding loop, as the measures need it: `step()` runs the next decoding step, `finished()`
    says whether steps remain, `restart()` puts the program back at its first step (same objects, so a compiled
    step's guards still hold)."""

    step: Callable[[], None]
    finished: Callable[[], bool]
    restart: Callable[[], None]


# new_program(wrap) -> a Program whose LM pass is wrap(pass): how a measure sees the pass inside a step
NewProgram = Callable[[Callable[[Pass], Pass]], Program]


class OpCount(TorchDispatchMode):
    """Counts aten ops while active, per phase ("step" or "pass"), and the host syncs among them."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "step"
        self.counts: dict[str, int] = {"step": 0, "pass": 0}
        self.syncs: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        self.counts[self.phase] += 1
        name = str(func)
        if name in SYNC_OPS:
            self.syncs[name] = self.syncs.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


class ToListCount(TorchFunctionMode):
    """Counts Tensor.tolist() calls, which read a tensor without dispatching an aten op (OpCount cannot see them).
    On a CPU a host tensor and a device one look alike: a count here is a candidate sync, to be read in the code."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        if func is torch.Tensor.tolist:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _median_summary(values: Sequence[float], digits: int = 3) -> dict[str, float]:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "n": len(values)}


def count_ops(new_program: NewProgram) -> dict[str, Any]:
    """Every step of one program under an op counter: ops per pass and per step, host syncs inside the loop."""
    log, tolist = OpCount(), ToListCount()

    def wrap(lm_pass: Pass) -> Pass:
        def counted(*args: Any) -> Any:
            log.phase = "pass"
            try:
                return lm_pass(*args)
            finally:
                log.phase = "step"
        return counted

    prog = new_program(wrap)  # built outside the counter: drawing noise and the schedule precede the loop
    per_pass, per_step = [], []
    with torch.no_grad(), tolist, log:
        while not prog.finished():
            before = dict(log.counts)
            prog.step()
            per_pass.append(log.counts["pass"] - before["pass"])
            per_step.append(log.counts["step"] + log.counts["pass"] - before["step"] - before["pass"])
    return {"ops_per_pass": _median_summary(per_pass, 1), "ops_per_step": _median_summary(per_step, 1),
            "passes": len(per_step), "host_syncs_in_loop": sum(log.syncs.values()), "sync_ops": log.syncs,
            "tolist_in_loop": tolist.calls}


def time_steps(new_program: NewProgram, loops: int) -> dict[str, Any]:
    """Wall ms of each step and of its LM pass over `loops` whole programs (eager); rest = step - pass."""
    step_ms, pass_ms = [], []
    holder = [0.0]

    def wrap(lm_pass: Pass) -> Pass:
        def timed(*args: Any) -> Any:
            t0 = time.perf_counter()
            out = lm_pass(*args)
            holder[0] = (time.perf_counter() - t0) * 1e3
            return out
        return timed

    with torch.no_grad():
        for _ in range(loops):
            prog = new_program(wrap)
            while not prog.finished():
                t0 = time.perf_counter()
                prog.step()
                step_ms.append((time.perf_counter() - t0) * 1e3)
                pass_ms.append(holder[0])
    return {"step_ms": _median_summary(step_ms), "pass_ms": _median_summary(pass_ms),
            "rest_ms": _median_summary([s - p for s, p in zip(step_ms, pass_ms)])}


def _ancestors(event: Any) -> Iterator[Any]:
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def compile_report(new_program: NewProgram) -> dict[str, Any]:
    """One decoding step (the program's first) under torch._dynamo.explain, then compiled with a backend that runs
    each graph as traced, marked for the profiler: the share of the step's top-level aten ops inside graphs."""
    with torch.no_grad():
        torch._dynamo.reset()
        prog = new_program(lambda p: p)
        explained = torch._dynamo.explain(prog.step)()
        reasons = sorted({str(getattr(r, "reason", r)).splitlines()[0][:160] for r in explained.break_reasons})

        torch._dynamo.reset()
        graphs: list[int] = []

        def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
            graphs.append(sum(n.op in ("call_function", "call_method", "call_module") for n in gm.graph.nodes))

            def run(*args: Any) -> Any:
                with torch.profiler.record_function(GRAPH_MARK):
                    return gm.forward(*args)
            return run

        prog = new_program(lambda p: p)
        step = torch.compile(prog.step, backend=backend)
        step()  # traces and compiles; the next run replays
        prog.restart()
        compiled = len(graphs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
    inside = outside = 0
    for ev in prof.events():
        if not ev.name.startswith("aten::"):
            continue
        names = [a.name for a in _ancestors(ev)]
        if any(n.startswith("aten::") for n in names):
            continue  # an op called by another op (aten::linear -> aten::addmm): counted once, at the top
        if GRAPH_MARK in names:
            inside += 1
        else:
            outside += 1
    torch._dynamo.reset()
    # explain's graph_break_count leaves out a break after which no graph follows: count the breaks themselves
    breaks = sum(bool(getattr(r, "graph_break", True)) for r in explained.break_reasons)
    return {"graphs": explained.graph_count, "graph_breaks": breaks, "break_reasons": reasons,
            "fx_ops_in_graphs": explained.op_count, "aten_ops_in_graphs": inside, "aten_ops_outside": outside,
            "fraction_in_graphs": round(inside / max(inside + outside, 1), 4),
            "recompiled_on_replay": len(graphs) > compiled}


# --- the engine's own program and requests ---------------------------------------------------------------------


def engine_program(eng: Any, gen: Any) -> NewProgram:
    """This engine's static program for one prompt (engine.magnet.Decoding stepped by decode_step)."""
    from magnet_engine.engine import magnet

    cond = eng.text([PROMPT])

    def new(wrap: Callable[[Pass], Pass]) -> Program:
        dec = magnet.Decoding(eng.config, gen, 1, eng.device, None, magnet.row_generators(gen.seed, 1, eng.device),
                              step=eng.make_step(cond))
        lm_pass = wrap(eng.lm_pass)

        def restart() -> None:
            dec.done = 0

        return Program(lambda: magnet.decode_step(lm_pass, eng.sample, [dec]), lambda: dec.finished, restart)

    return new


def variant(eng: Any, name: str) -> tuple[Callable[..., None], Any, Any, Any]:
    """The (magnet.decode_step, make_step, sample, the LM's linear) engine requests run with as `name`: compile-step
    compiles decode_step (what every decoding loop calls), compile-pass the LM's forward (one graph per stage) and the
    sampler; deterministic / plain run eager with row-invariant or plain linears (Engine.set_deterministic)."""
    import torch.nn.functional as F
    from magnet_engine.engine import magnet
    from magnet_engine.engine.api import TorchStep

    if name == "eager":
        return magnet.decode_step, eng.make_step, eng.sample, eng.lm.linear
    if name == "compile-step":
        return torch.compile(magnet.decode_step), eng.make_step, eng.sample, eng.lm.linear
    if name == "compile-pass":
        return magnet.decode_step, TorchStep(torch.compile(eng.lm)), torch.compile(eng.sample), eng.lm.linear
    if name in LINEAR_VARIANTS:
        linear = eng.lm.invariant_linear if name == "deterministic" else F.linear  # the engine's own (backend's)
        return magnet.decode_step, eng.make_step, eng.sample, linear
    raise ValueError(f"unknown variant {name!r}: choose from {', '.join(VARIANTS + LINEAR_VARIANTS)}")


@contextlib.contextmanager
def swapped(eng: Any, parts: tuple[Callable[..., None], Any, Any, Any]) -> Iterator[None]:
    """Engine requests run with `parts` (see `variant`) inside the block; the engine and module as before after."""
    from magnet_engine.engine import magnet

    saved = magnet.decode_step, eng.make_step, eng.sample, eng.lm.linear
    magnet.decode_step, eng.make_step, eng.sample, eng.lm.linear = parts
    try:
        yield
    finally:
        magnet.decode_step, eng.make_step, eng.sample, eng.lm.linear = saved


def time_requests(eng: Any, gen: Any, names: Sequence[str], repeats: int, warmup: int) -> dict[str, Any]:
    """Seconds of a whole request (eng.generate: text, steps, codec) per variant, in one process: each variant's
    warm-up requests (compilation) first, then the timed requests round-robin over the variants, so load from
    other processes on a shared machine falls on all of them alike. Wall and process CPU seconds."""
    variants = {name: variant(eng, name) for name in names}
    limit = torch._dynamo.config.cache_size_limit
    torch._dynamo.reset()
    torch._dynamo.config.cache_size_limit = max(limit, sum(gen.steps) + 8)  # compile-step: one graph per step
    out: dict[str, Any] = {name: {"runs_s": [], "cpu_s": [], "warmup_s": []} for name in names}
    try:
        for name, parts in variants.items():
            with swapped(eng, parts):
                for _ in range(warmup):
                    t0 = time.perf_counter()
                    eng.generate([PROMPT], gen)
                    out[name]["warmup_s"].append(round(time.perf_counter() - t0, 2))
        for _ in range(repeats):
            for name, parts in variants.items():
                with swapped(eng, parts):
                    t0, c0 = time.perf_counter(), time.process_time()
                    eng.generate([PROMPT], gen)
                    out[name]["runs_s"].append(round(time.perf_counter() - t0, 4))
                    out[name]["cpu_s"].append(round(time.process_time() - c0, 4))
    finally:
        torch._dynamo.config.cache_size_limit = limit
        torch._dynamo.reset()
    for r in out.values():
        r["median_s"], r["median_cpu_s"] = statistics.median(r["runs_s"]), statistics.median(r["cpu_s"])
    if "eager" in out:
        for r in out.values():
            r["speedup_vs_eager"] = round(out["eager"]["median_s"] / r["median_s"], 3)
    return out


def measure(model: str, args: argparse.Namespace, command: str) -> dict[str, Any]:
    from .common import git_sha, host, versions
    from .presets import build

    built = build(model, "magnet", torch.device("cpu"), None, seed=0)
    eng = built.engine
    fields: dict[str, Any] = {"duration": args.duration, "seed": 0}
    if args.steps:
        fields["steps"] = tuple(int(s) for s in args.steps.split(","))
    gen = eng.settings(**fields)
    new = engine_program(eng, gen)
    ops = count_ops(new)
    row: dict[str, Any] = {
        "bench": "overhead", "model": model, "weights": built.weights, "params_m": built.params_m, "device": "cpu",
        "dtype": str(next(eng.lm.parameters()).dtype).removeprefix("torch."), "batch": 1,
        "duration_s": args.duration, "frames": gen.frames(eng.config), "steps": list(gen.steps),
        "guided": gen.guided, **ops, **time_steps(new, args.loops), "compile": compile_report(new),
    }
    variants = [v for v in args.variants.split(",") if v]
    row["requests"] = time_requests(eng, gen, variants, args.repeats, args.warmup) if variants and args.repeats else {}
    row.update(git_sha=git_sha(), versions=versions(), host=host(), command=command,
               timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               notes="CPU: step/pass ms are compute plus dispatch (the device is the host)")
    return row


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m magnet_engine.bench overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="comma-separated: a preset (tiny, magnet-small-10secs, ...), "
                   "default (the shipped model) or a checkpoint folder; one row each")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of audio per request")
    p.add_argument("--steps", default=None, help="decoding steps per stage, e.g. 20,10,10,10 (default: the model's)")
    p.add_argument("--loops", type=int, default=1, help="whole programs timed step by step")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="whole-request variants to time, comma-separated from "
                        f"{', '.join(VARIANTS + LINEAR_VARIANTS)}; '' for none")
    p.add_argument("--repeats", type=int, default=3, help="timed requests per variant (0: no request timing)")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests per variant first (compilation)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="append one JSON row per model to FILE")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.loops < 1 or args.repeats < 0 or args.warmup < 0:
        p.error("--duration must be > 0, --loops >= 1, --repeats and --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = "python -m magnet_engine.bench overhead " + shlex.join(list(sys.argv[1:] if argv is None else argv))
    for model in args.model.split(","):
        try:
            row = measure(model, args, command)
        except ValueError as e:
            print(f"bench overhead: error: {e}", file=sys.stderr)
            return 2
        emit([row], args.json)
    return 0
