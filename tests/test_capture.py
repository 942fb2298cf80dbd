"""Capture legality, proven on a CPU: every path a CUDA graph captures (the one-request program, a packed pass of
requests at different stages, `decode_together`'s cohort program, the AR frame loop) runs on the `meta` device under
`engine.graph.CaptureCheck`, which records host data reaching the device, host syncs, data-dependent shapes and host
tensors mixed into device ops. On `meta` a tensor made without `device=` is a host tensor, so what would be a
pageable copy (and an illegal call inside a capture) on a GPU is visible here. Also: capture failures are recorded
and run eagerly, replays copy only what changed, and a request's set-up makes one host-to-device copy."""
from __future__ import annotations

import contextlib
import dataclasses
import logging

import pytest
import torch
from magnet_engine.engine import api, graph, magnet, musicgen, passes
from magnet_engine.engine.api import Engine, GraphedPass, PackedPass, TorchStep
from magnet_engine.engine.config import GenerationConfig, ModelConfig
from magnet_engine.engine.graph import CaptureCheck, CaptureError, ProgramCache
from magnet_engine.engine.model import LM
from magnet_engine.engine.sampling import sample_ref

META = torch.device("meta")
CFG = ModelConfig(kind="magnet", dim=32, num_heads=4, num_layers=2, ffn_dim=64, card=16, n_q=4, text_dim=8,
                  text_encoder="none", segment_duration=1.0)
AR_CFG = dataclasses.replace(CFG, kind="musicgen", delays=(0, 1, 2, 3))


def gen(**kw) -> GenerationConfig:
    base = dict(duration=0.5, steps=(3, 2, 1, 1), cfg=(3.0, 1.0), greedy=False, top_p=0.9, seed=None)
    return dataclasses.replace(GenerationConfig(), **{**base, **kw})


@pytest.fixture(scope="module")
def lm() -> LM:
    return LM(CFG).to(META).eval()


def request(lm: LM, g: GenerationConfig, batch: int = 1, text_len: int = 5) -> magnet.Decoding:
    cond = torch.zeros(batch, text_len, CFG.dim, device=META)
    return magnet.Decoding(CFG, g, batch, META, None, None, step=TorchStep(lm)(cond))


def assert_legal(check: CaptureCheck) -> None:
    assert not check.violations, "not capture-legal:\n" + "\n".join(map(str, check.violations))


@torch.no_grad()
@pytest.mark.parametrize("kw", [dict(), dict(greedy=True), dict(top_p=0.0, top_k=3), dict(top_p=0.0),
                                dict(span_arrangement="stride1"), dict(cfg=(1.0, 1.0))],
                         ids=["top_p", "greedy", "top_k", "multinomial", "stride1", "unguided"])
def test_one_request_program(lm, kw):
    """A request's whole program (every stage and step, `each_alone`) moves no host data and never syncs."""
    dec = request(lm, gen(**kw))
    with CaptureCheck() as check:
        magnet.run_together(magnet.each_alone, sample_ref, [dec])
    assert_legal(check)
    assert dec.finished


@torch.no_grad()
def test_packed_pass_of_requests_at_different_stages(lm):
    """One packed LM pass (and the step around it) over requests at different stages, lengths, text lengths,
    batch sizes and guidance: what the scheduler runs, and what `GraphedPass` captures."""
    decs = [request(lm, gen(), 1, 5), request(lm, gen(duration=0.3), 2, 7), request(lm, gen(cfg=(1.0, 1.0)), 1, 3),
            request(lm, gen(greedy=True), 1, 5)]
    for d, done in zip(decs, (0, 3, 5, 6)):  # stages 0, 1, 2, 3
        d.done = done
    assert len({d.stage for d in decs}) == 4
    with CaptureCheck() as check:
        magnet.decode_step(PackedPass(lm), sample_ref, decs)
    assert_legal(check)


def meta_engine(lm: LM) -> Engine:
    eng = Engine(CFG, text=None, codec=None, device=META, lm=lm)  # type: ignore[arg-type]
    eng.graph = True  # set_graph wants CUDA; the replay contract is the same on any device
    return eng


@torch.no_grad()
def test_decode_together_program(lm):
    """The whole-cohort program (`Engine.decode_together` with graphs on): built, then replayed for a second
    cohort of the same shapes, without a host copy or sync."""
    eng = meta_engine(lm)
    for _ in range(2):
        decs = [request(lm, gen(), 1, 5), request(lm, gen(greedy=True), 2, 4)]
        with CaptureCheck() as check:
            eng.decode_together(decs)
        assert_legal(check)
    assert eng.programs.captures == 1 and not eng.capture_failures()


@torch.no_grad()
def test_scheduler_pass_graphs(lm):
    """`GraphedPass` over a changing batch: captures and replays, slot refills, all capture-legal."""
    gp = GraphedPass(lm, META)
    decs = [request(lm, gen(), 1, 5), request(lm, gen(greedy=True), 1, 6)]
    with CaptureCheck() as check:
        while live := [d for d in decs if not d.finished]:
            magnet.decode_step(gp, sample_ref, live)
    assert_legal(check)
    assert gp.passes["graph"] > 0 and gp.graphs.captures > 0


@torch.no_grad()
def test_ar_program(monkeypatch):
    """The AR baseline's frame loop as `mode="program"` captures it: the loop itself (what a graph holds) is legal;
    its set-up makes no sync."""
    lm_ar = LM(AR_CFG).to(META).eval()
    checks: list[CaptureCheck] = []
    real = graph.Captured

    class Checked(real):  # the captured function runs under its own check
        def __init__(self, fn, inputs, device, pool=None):
            def checked():
                with CaptureCheck() as check:
                    out = fn()
                checks.append(check)
                return out
            super().__init__(checked, inputs, device, pool)

    monkeypatch.setattr(musicgen, "Captured", Checked)
    cond = torch.zeros(2, 5, AR_CFG.dim, device=META)
    programs = ProgramCache()
    with CaptureCheck() as setup:
        for g in (gen(), gen(greedy=True)):
            musicgen.generate_tokens_ar(lm_ar, cond, g, 2, META, mode="program", programs=programs)
    assert len(checks) == 2 and programs.captures == 2
    for check in checks:
        assert_legal(check)
    assert not [v for v in setup.violations if v.kind in ("sync", "shape")], setup.violations


@torch.no_grad()
def test_check_sees_what_a_capture_forbids():
    """The checker itself: each kind of violation is caught where it happens."""
    x = torch.zeros(4, 3, device=META)
    with CaptureCheck() as check:
        x * torch.tensor(2.0)  # a host scalar tensor in a device op (meta refuses larger ones itself)
        torch.arange(3).to(META)  # a host-to-device copy
        torch.tensor([1.0, 2.0], device=META)  # host data to the device
        torch.as_tensor(x, device=META)  # not a copy: already there
        for read in (x.nonzero, lambda: x[x > 0], lambda: x.sum().item(), lambda: bool(x.any())):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # meta cannot answer these: seen before
                read()
        host = torch.ones(3)
        host.nonzero(), host.sum().item()  # host maths (a request's set-up): no device involved
    assert [v.kind for v in check.violations] == ["mixed", "copy", "copy", "shape", "shape", "sync", "sync"]
    assert all(v.where.startswith("tests/test_capture.py:") for v in check.violations)


@torch.no_grad()
def test_request_setup_makes_one_copy(lm):
    """A request's set-up (buffers, schedule, sampling parameters, noise) makes one host-to-device copy and no
    sync, so the scheduler can start one between other requests' passes."""
    cond = torch.zeros(1, 5, CFG.dim, device=META)
    step = TorchStep(lm)(cond)
    for kw in (dict(), dict(greedy=True), dict(span_arrangement="stride1")):
        with CaptureCheck() as check:
            magnet.Decoding(CFG, gen(**kw), 2, META, None, None, step=step)
        assert [v.kind for v in check.violations] == ["copy"], check.violations


class Launches(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.uniform = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.uniform += getattr(func, "__name__", "") in ("uniform_", "rand")
        return func(*args, **(kwargs or {}))


def test_noise_one_draw_per_row():
    """Each row's noise of every step in one launch per generator, equal to the draw per step and row it replaces
    (on CPU one [S, T] draw is S draws of [T], in order)."""
    steps, batch, frames = 13, 3, 50
    gens = magnet.row_generators(7, batch, torch.device("cpu"))
    with Launches() as launches:
        noise = magnet.draw_noise(steps, batch, frames, torch.device("cpu"), gens)
    assert launches.uniform == batch and noise.is_contiguous()
    for b in range(batch):
        g = torch.Generator().manual_seed(7 + b)
        assert torch.equal(noise[:, b], torch.stack([torch.rand(frames, generator=g) for _ in range(steps)]))


def test_capture_failure_runs_eagerly_and_is_counted(tiny, monkeypatch, caplog):
    """A pass layout whose capture fails is recorded with its reason, runs eagerly from then on (no second try),
    and reaches no request: the scheduler does not retry it as a request failure."""
    from magnet_engine.engine.scheduler import Scheduler

    tries = []

    def failing(*args, **kwargs):
        tries.append(1)
        raise CaptureError("RuntimeError: operation not permitted when stream is capturing")

    kw = dict(duration=0.4, steps=(2, 1, 1, 1), seed=3)
    solo = [tiny.generate([p], **kw).codes for p in ("a", "b")]
    monkeypatch.setattr(passes, "Captured", failing)
    monkeypatch.setattr(tiny, "graph", True)
    monkeypatch.setattr(tiny, "lm_pass", GraphedPass(tiny.lm, tiny.device))
    with caplog.at_level(logging.WARNING), Scheduler(tiny, max_batch=4) as sched:
        futures = [sched.submit(p, **kw) for p in ("a", "b")]
        out = [f.result(timeout=120).codes for f in futures]
    for a, b in zip(out, solo):
        assert torch.equal(a, b)
    failures = tiny.capture_failures()
    assert failures and "stream is capturing" in failures[0]
    assert len(tries) == len(tiny.lm_pass.graphs.failures) > 0  # one try per layout
    assert tiny.lm_pass.passes["graph"] == 0
    assert "retrying each alone" not in caplog.text


def test_program_capture_failure_runs_eagerly(tiny, monkeypatch):
    """`decode_together` and the AR program fall back to their eager loop when the capture fails."""
    monkeypatch.setattr(api, "Captured", lambda *a, **k: (_ for _ in ()).throw(CaptureError("simulated")))
    monkeypatch.setattr(tiny, "graph", True)
    monkeypatch.setattr(tiny, "programs", ProgramCache())
    kw = dict(duration=0.4, steps=(2, 1, 1, 1), seed=3)
    solo = tiny.generate(["a"], **kw).codes
    from magnet_engine.engine.scheduler import start_request

    (codes,) = tiny.decode_together([start_request(tiny, "a", tiny.settings(**kw))])
    assert torch.equal(codes, solo)
    assert tiny.capture_failures() and tiny.programs.captures == 0


@torch.no_grad()
def test_replay_copies_only_what_changed(lm, monkeypatch):
    """A replay copies each request's codes; a slot's text k/v only when another request takes the slot."""
    copied: list[int] = []
    real = passes.copy_grouped
    monkeypatch.setattr(passes, "copy_grouped", lambda pairs: (copied.append(len(pairs)), real(pairs)))
    gp = GraphedPass(lm, META)
    kv = 2 * CFG.num_layers
    a, b = request(lm, gen(steps=(8, 1, 1, 1))), request(lm, gen(steps=(8, 1, 1, 1)))
    for _ in range(3):  # eager, capture (+ first fill), replay
        magnet.decode_step(gp, sample_ref, [a, b])
    assert gp.passes == {"eager": 1, "graph": 2}
    assert copied == [2, 2]  # the capture's own requests hold their slots: codes only
    c = request(lm, gen(steps=(8, 1, 1, 1)))
    c.done = a.done
    magnet.decode_step(gp, sample_ref, [c, b])  # c takes a's slot (same layout)
    assert copied[-1] == 2 + kv
    magnet.decode_step(gp, sample_ref, [c, b])
    assert copied[-1] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (none here): the meta-device "
                    "proofs above stand in for it on CPU")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_every_path_captures(fixture_dir, dtype):  # pragma: no cover - GPU only
    """On a GPU: the one-request program, decode_together, the scheduler's per-pass graphs (requests joining at
    different stages) and the AR program all capture without a failure, and replay the eager run's tokens."""
    from magnet_engine.engine.scheduler import Scheduler, start_request

    import magnet_engine as me

    kw = dict(duration=0.6, steps=(3, 2, 2, 2), seed=5)
    eng = me.load(fixture_dir, device="cuda", dtype=dtype, deterministic=True)
    eager = [eng.generate([p], **kw).codes for p in ("a piano", "drums", "a choir")]
    eng.set_graph(True)
    for p, ref in zip(("a piano", "drums", "a choir"), eager):
        assert torch.equal(eng.generate([p], **kw).codes, ref)
    together = eng.decode_together([start_request(eng, p, eng.settings(**kw)) for p in ("a piano", "drums")])
    assert all(torch.equal(a, b) for a, b in zip(together, eager))
    with Scheduler(eng, max_batch=4) as sched:
        futures = [sched.submit(p, **kw) for p in ("a piano", "drums", "a choir")]
        out = [f.result(timeout=300).codes for f in futures]
    assert all(torch.equal(a, b) for a, b in zip(out, eager))
    ar = me.load(fixture_dir / "musicgen_state_dict.bin", device="cuda", dtype=dtype, graph=True)
    ar.generate(["a piano"], duration=0.5, seed=1)
    assert eng.capture_failures() == [] and ar.capture_failures() == []
    assert eng.lm_pass.passes["graph"] > 0 and eng.programs.captures > 0 and ar.programs.captures == 1
