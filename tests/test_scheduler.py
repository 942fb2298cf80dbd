"""me.Scheduler: requests batched at every decoding step, each token-identical to its solo `generate` run."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
from magnet_engine.engine.scheduler import QueueFull, RequestTimeout, Scheduler

import magnet_engine as me

LONG = "upbeat electronic dance track with a heavy bass line at 128 bpm"


def mixed_requests(defaults: dict) -> list[tuple[str | None, dict]]:
    """Texts of different lengths, durations, steps, seeds; greedy and sampled (top-p, top-k, multinomial);
    guided and unguided; nonoverlap and stride1; max and prod scoring."""
    d = defaults
    return [
        (LONG, dict(d, greedy=True, duration=1.0)),
        ("slow sad piano", dict(d, greedy=False, seed=3, duration=0.5, top_p=0.9)),
        (None, dict(d, greedy=False, seed=4, duration=0.7, span_arrangement="stride1", top_p=0.0, top_k=5)),
        ("drums", dict(d, greedy=True, cfg=(1.0,), steps=(3, 1, 2, 5), duration=0.9)),
        ("jazz", dict(d, greedy=False, seed=5, cfg=(3.0,), top_p=0.0, top_k=0, duration=0.3, span_scoring="prod")),
        (LONG, dict(d, greedy=False, seed=6, cfg=(1.0,), span_arrangement="stride1", steps=(2, 2, 1, 1))),
    ]


TINY = dict(steps=(4, 2, 2, 2), temperature=3.0, top_p=0.9, top_k=0, cfg=(10.0, 1.0), anneal_temp=True)


@pytest.fixture(scope="module")
def default_engine():
    return me.load(device="cpu", deterministic=True)


def check_identical(eng, requests: list[tuple[str | None, dict]], max_batch: int) -> Scheduler:
    solo = [eng.generate([p], **kw) for p, kw in requests]
    with Scheduler(eng, max_batch=max_batch) as sched:
        futures = [sched.submit(p, **kw) for p, kw in requests]
        outs = [f.result(timeout=120) for f in futures]
    for (p, kw), a, b in zip(requests, solo, outs):
        assert b.codes.shape == a.codes.shape and b.audio.shape == a.audio.shape == (1, 1, a.audio.shape[-1])
        assert torch.equal(b.codes, a.codes), f"{p!r} {kw}: tokens differ from the solo run"
        assert torch.equal(b.audio, a.audio)
    return sched


@pytest.mark.parametrize("max_batch", [4, 16])
def test_mixed_requests_token_identical_tiny(tiny, max_batch):
    sched = check_identical(tiny, mixed_requests(TINY), max_batch)
    assert max(sched.batch_sizes) == min(max_batch, 6), "requests must share passes"


def test_a_packed_pass_runs_the_last_layer_at_the_frames_each_request_samples(tiny, monkeypatch):
    """As a request's own CPU step does (tests/test_static.py), the pack's last layer keeps only the frames each
    request samples: fewer than all at a stage's later steps, and still each request's solo tokens."""
    narrowed: list[bool] = []
    packed = tiny.lm.forward_packed

    def recorded(parts, frames=None, joined=None):
        narrowed.append(frames is not None and sum(f.numel() for f in frames) < sum(p.n * p.t for p in parts))
        return packed(parts, frames, joined)

    monkeypatch.setattr(tiny.lm, "forward_packed", recorded)
    check_identical(tiny, mixed_requests(TINY), max_batch=16)
    assert any(narrowed) and not all(narrowed)


def test_mixed_requests_token_identical_default(default_engine):
    d = dict(default_engine.default_generation().overrides(me.GenerationConfig()))
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    reqs = [(p, {**kw, "duration": min(kw.get("duration") or 1.0, 1.0)}) for p, kw in mixed_requests(d)]
    reqs += [("a calm ambient pad", dict(d, seed=11, duration=1.0)), ("rock", dict(d, seed=12, duration=0.4))]
    check_identical(default_engine, reqs, max_batch=8)


def test_forward_packed_equals_each_own_pass(tiny):
    """Deterministic mode (the `tiny` fixture's; off by default): a 3-frame unguided request's rows inside a pack of
    other requests' (which a plain GEMM would compute with another kernel than the 3 rows alone) equal its own pass,
    bit for bit; so do rows longer than a block (a GEMM of their own shape: `invariant_rows`), alone in their
    width or beside another request's."""
    assert tiny.lm.deterministic
    from magnet_engine.engine.model import Rows

    g = torch.Generator().manual_seed(0)
    parts = [Rows(torch.randint(0, 2049, (n, 4, t), generator=g), stage, tiny.lm.cross_kv(tiny.text([text])))
             for n, t, stage, text in [(2, 50, 0, LONG), (1, 3, 1, "x"), (2, 5, 2, None), (1, 498, 3, "piano"),
                                       (1, 130, 1, "drums"), (2, 130, 1, "bass")]]
    with torch.no_grad():
        for p, out in zip(parts, tiny.lm.forward_packed(parts)):
            assert torch.equal(out, tiny.lm(p.codes, p.stage, p.cross))
        # the last layer at some frames of each row (the frames a CPU step samples), widths 1..T
        frames = [torch.stack([torch.randperm(p.t, generator=g)[:w].sort().values for _ in range(p.n)])
                  for p, w in zip(parts, (17, 1, 5, 300, 64, 70))]
        for p, f, out in zip(parts, frames, tiny.lm.forward_packed(parts, frames)):
            assert out.shape == (p.n, f.shape[1], tiny.lm.cfg.card)
            assert torch.equal(out, tiny.lm(p.codes, p.stage, p.cross, f))


def count_passes(eng, monkeypatch, hook=None) -> list[int]:
    """Record the number of requests in every LM pass (Engine.lm_pass); `hook(call_index)` runs before each pass."""
    sizes: list[int] = []
    forward = eng.lm_pass

    def counted(decs):
        if hook is not None:
            hook(len(sizes))
        sizes.append(len(decs))
        return forward(decs)

    monkeypatch.setattr(eng, "lm_pass", counted)
    return sizes


def test_join_and_leave_mid_flight(tiny, monkeypatch):
    long_kw = dict(TINY, greedy=True, steps=(8, 8, 8, 8), duration=1.0)
    short_kw = dict(TINY, greedy=False, seed=1, steps=(2, 1, 1, 1), duration=0.4)
    want_long, want_short = tiny.generate([LONG], **long_kw).codes, tiny.generate(["piano"], **short_kw).codes
    box = {}
    with Scheduler(tiny, max_batch=4) as sched:
        def hook(i):  # from the loop thread, while the long request is at its 4th step
            if i == 3:
                box["short"] = sched.submit("piano", **short_kw)
        sizes = count_passes(tiny, monkeypatch, hook)
        long_f = sched.submit(LONG, **long_kw)
        short_out, long_out = box_result(box, "short"), long_f.result(timeout=60)
    # joined at the next pass (the 5th), left right after its 5 steps, while the long one kept going
    assert sizes == [1] * 4 + [2] * 5 + [1] * (32 - 9)
    assert torch.equal(short_out.codes, want_short) and torch.equal(long_out.codes, want_long)


def box_result(box: dict, key: str, timeout: float = 60):
    for _ in range(600):
        if key in box:
            return box[key].result(timeout=timeout)
        threading.Event().wait(0.1)
    raise AssertionError(f"{key} was never submitted")


def blocked_loop(eng, monkeypatch) -> threading.Event:
    """Make every LM pass wait for the returned event (set it to let the loop go)."""
    go = threading.Event()
    count_passes(eng, monkeypatch, lambda i: go.wait(60))
    return go


def test_queue_bound(tiny, monkeypatch):
    go = blocked_loop(tiny, monkeypatch)
    kw = dict(TINY, greedy=True, duration=0.2)
    with Scheduler(tiny, max_batch=1, max_queue=2) as sched:
        first = sched.submit("a", **kw)
        for _ in range(100):  # the first request is admitted (then the loop blocks in its pass)
            if first.running():
                break
            threading.Event().wait(0.05)
        queued = [sched.submit("b", **kw), sched.submit("c", **kw)]
        with pytest.raises(QueueFull, match="max_queue=2"):
            sched.submit("d", **kw)
        go.set()
        assert all(f.result(timeout=60).codes.shape == (1, 4, 9) for f in [first, *queued])
    with pytest.raises(RuntimeError, match="closed"):
        sched.submit("e", **kw)


def test_deadline(tiny, monkeypatch):
    count_passes(tiny, monkeypatch, lambda i: threading.Event().wait(0.05))  # 50 ms per pass
    kw = dict(TINY, greedy=True, duration=0.5)
    with Scheduler(tiny, max_batch=2) as sched:
        late = sched.submit(LONG, timeout=0.2, **dict(kw, steps=(20, 10, 10, 10)))
        fine = sched.submit("piano", **kw)
        with pytest.raises(RequestTimeout, match="timeout"):
            late.result(timeout=60)
        assert torch.equal(fine.result(timeout=60).codes, tiny.generate(["piano"], **kw).codes)


def test_bad_settings_fail_their_own_future(tiny):
    """Each bad request's future holds its own error (type and message); the good one beside them runs."""
    bad = [(("a",), dict(steps=(1, 2)), ValueError, "steps needs 4 values, got 2"),
           (("a",), dict(top_p=2.0), ValueError, r"top_p must be in \[0, 1\], got 2"),
           (("a",), dict(duration=5000.0), ValueError, r"duration must be in \(0, 3600\], got 5000"),
           (("a",), dict(timeout=-1.0), ValueError, "timeout must be > 0, got -1"),
           (("a",), dict(hybrid_prefix=0.1), ValueError, "hybrid_prefix needs ar_model"),
           ((3,), {}, TypeError, "prompts 1 of 1 must be a text, got int"),
           (("a",), dict(rescore_weight=0.5), ValueError, "rescore_weight needs rescorer"),
           (("a",), dict(unknown_field=1), ValueError, "unknown setting unknown_field")]
    with Scheduler(tiny) as sched:
        futures = [sched.submit(*args, **kw) for args, kw, _, _ in bad]
        good = sched.submit("a", **dict(TINY, greedy=True, duration=0.2))
        for f, (_, _, kind, match) in zip(futures, bad):
            with pytest.raises(kind, match=match):
                f.result(timeout=10)
        assert good.result(timeout=60).codes.shape == (1, 4, 9)


def test_error_isolated_to_its_request(tiny, monkeypatch):
    text = tiny.text

    def failing_text(prompts):
        if prompts == ["boom"]:
            raise RuntimeError("text encoder failed on boom")
        return text(prompts)

    monkeypatch.setattr(tiny, "text", failing_text)
    kw = dict(TINY, greedy=True, duration=0.3)
    with Scheduler(tiny, max_batch=4) as sched:
        futures = [sched.submit(p, **kw) for p in ("one", "boom", "two")]
        with pytest.raises(RuntimeError, match="boom"):
            futures[1].result(timeout=60)
        for f, p in zip([futures[0], futures[2]], ("one", "two")):
            assert torch.equal(f.result(timeout=60).codes, tiny.generate([p], **kw).codes)


def test_a_failed_pass_retries_each_request_alone(tiny, monkeypatch):
    """A pass that fails once (in the sampler, after the noise was drawn): every request runs that step again
    alone with its pre-drawn noise, and all finish token-identical to their solo runs; the loop serves on."""
    kw = [dict(TINY, greedy=False, seed=s, duration=d) for s, d in ((1, 0.3), (2, 0.5), (3, 0.3))]
    prompts = ("one", "two", "three")
    want = [tiny.generate([p], **k).codes for p, k in zip(prompts, kw)]
    sample, calls = tiny.sample, []

    def flaky(*args, **kwargs):
        calls.append(len(args[0]))
        if len(calls) == 3:
            raise RuntimeError("sampler failed once")
        return sample(*args, **kwargs)

    monkeypatch.setattr(tiny, "sample", flaky)
    with Scheduler(tiny, max_batch=4) as sched:
        with sched._cv:  # all three start together
            futures = [sched.submit(p, **k) for p, k in zip(prompts, kw)]
        outs = [f.result(timeout=60).codes for f in futures]
    assert all(torch.equal(o, w) for o, w in zip(outs, want))


def test_a_request_that_fails_every_pass_fails_alone(tiny, monkeypatch):
    """A request whose pass always fails (here: its frame count) fails; the requests beside it are retried without
    it and finish as if alone. A pass of one request has nobody to retry: it fails."""
    kw = dict(TINY, greedy=True)
    bad_t = tiny.generate(["x"], **kw, duration=0.7).codes.shape[-1]
    forward = tiny.lm_pass

    def poisoned(decs):
        if any(d.frames == bad_t for d in decs):
            raise RuntimeError("poisoned pass")
        return forward(decs)

    monkeypatch.setattr(tiny, "lm_pass", poisoned)
    with Scheduler(tiny, max_batch=4) as sched:
        with sched._cv:
            futures = [sched.submit(p, **kw, duration=d) for p, d in (("one", 0.3), ("boom", 0.7), ("two", 0.5))]
        with pytest.raises(RuntimeError, match="poisoned"):
            futures[1].result(timeout=60)
        for f, p, d in ((futures[0], "one", 0.3), (futures[2], "two", 0.5)):
            assert torch.equal(f.result(timeout=60).codes, tiny.generate([p], **kw, duration=d).codes)
        with pytest.raises(RuntimeError, match="poisoned"):
            sched.submit("alone", **kw, duration=0.7).result(timeout=60)
        assert sched.submit("after", **kw, duration=0.3).result(timeout=60).codes.shape[-1] > 0


def test_close_with_requests_in_flight(tiny, monkeypatch):
    kw = dict(TINY, greedy=True, duration=0.3)
    sched = Scheduler(tiny, max_batch=2)
    futures = [sched.submit(f"p{i}", **kw) for i in range(5)]
    sched.close()  # finishes in-flight and queued work, then joins
    assert not sched._thread.is_alive()
    assert all(f.done() and f.result().codes.shape == (1, 4, 15) for f in futures)

    go = blocked_loop(tiny, monkeypatch)
    sched = Scheduler(tiny, max_batch=1)
    futures = [sched.submit(f"p{i}", **kw) for i in range(3)]
    for _ in range(100):
        if futures[0].running():
            break
        threading.Event().wait(0.05)
    threading.Timer(0.2, go.set).start()
    sched.close(cancel_pending=True)  # the one in flight finishes, the queued ones are cancelled
    assert futures[0].result().codes.shape == (1, 4, 15)
    assert all(f.cancelled() for f in futures[1:])


def test_engine_generate_one_seed_per_prompt(tiny):
    """Several prompts: prompt b draws from seed + b (equal prompts pad alike, so rows compare with solo runs)."""
    kw = dict(TINY, greedy=False, duration=0.5)
    both = tiny.generate(["piano", "piano"], seed=7, **kw).codes
    assert torch.equal(both[0], tiny.generate(["piano"], seed=7, **kw).codes[0])
    assert torch.equal(both[1], tiny.generate(["piano"], seed=8, **kw).codes[0])


def test_onnx_engine_token_identical(fixture_dir, tmp_path_factory):
    """The scheduler drives every backend through the one decoding step: an onnxruntime engine (whose pass runs
    each request alone, `magnet.each_alone`) serves mixed requests, each equal to its solo run."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install -e '.[onnx]'")
    from magnet_engine.export.onnx_export import export_model

    out = tmp_path_factory.mktemp("scheduler-onnx") / "export"
    export_model(fixture_dir, out)
    eng = me.load(out, device="cpu")
    assert eng.backend == "onnx" and eng.lm is None
    check_identical(eng, [(p, {**kw, "steps": (2, 1, 1, 1)}) for p, kw in mixed_requests(TINY)[:4]], max_batch=4)


def test_engine_of_another_kind_is_refused():
    fake = SimpleNamespace(lm=None, config=SimpleNamespace(kind="musicgen"))
    with pytest.raises(ValueError, match="musicgen"):
        Scheduler(fake)  # type: ignore[arg-type]


def test_triton_backend_token_identical(fixture_dir):
    """kernels.apply swaps the attention op (used per request by the packed pass) and the sampler (called once per
    iteration with per-row parameters): the scheduler on that engine equals its solo runs (Triton interpreter)."""
    pytest.importorskip("triton", reason="triton is not installed: pip install 'triton>=3.2' (extra [triton])")
    from magnet_engine.kernels.backend import apply as triton_apply

    eng = triton_apply(me.load(fixture_dir, device="cpu", deterministic=True))
    reqs = mixed_requests(dict(TINY, steps=(2, 1, 1, 1)))
    check_identical(eng, [(p, {**kw, "steps": (2, 1, 1, 1)}) for p, kw in reqs[:4]], max_batch=4)


def test_loader_runs_in_the_loop_thread(fixture_dir, tiny):
    """Scheduler(loader): the model is loaded by the loop thread (all torch work in one thread); loader errors
    are raised by the constructor."""
    threads = []

    def load():
        threads.append(threading.current_thread().name)
        return me.load(fixture_dir, device="cpu", deterministic=True)

    kw = dict(TINY, greedy=False, seed=2, duration=0.4)
    with Scheduler(load, max_batch=2) as sched:
        out = sched.submit("piano", **kw).result(timeout=60)
    assert threads == ["magnet-scheduler"]
    assert torch.equal(out.codes, tiny.generate(["piano"], **kw).codes)
    with pytest.raises(ValueError, match="no such model"):
        Scheduler(lambda: (_ for _ in ()).throw(ValueError("no such model")))


def test_max_frames_budget_is_fifo(tiny, monkeypatch):
    """max_frames bounds rows x frames per pass: a request that does not fit waits, and nobody overtakes it."""
    sizes = count_passes(tiny, monkeypatch)
    kw = dict(TINY, greedy=True, steps=(1, 1, 1, 1))
    big, small = dict(kw, duration=1.0), dict(kw, duration=0.2)  # guided: 2 x 48 = 96 and 2 x 9 = 18 frames
    with Scheduler(tiny, max_batch=8, max_frames=140) as sched:
        with sched._cv:  # (reentrant) the loop admits nothing until all four are queued
            futures = [sched.submit("a", **big), sched.submit("b", **small), sched.submit("c", **big),
                       sched.submit("d", **small)]
        for f in futures:
            f.result(timeout=60)
    # a + b = 114; c (+96) waits, and d (+18, would fit) does not overtake it; then c + d
    assert sizes == [2] * 8


def test_stream_a_long_piece_beside_batched_requests(tiny):
    """A long piece streams one window per loop iteration between batched steps: its chunks are Engine.
    generate_stream's (so they join to generate's audio), and the short requests beside it stay token-identical."""
    long_kw = dict(TINY, greedy=False, seed=7, duration=2.5)
    short = [("piano", dict(TINY, greedy=True, duration=0.5)), (LONG, dict(TINY, greedy=False, seed=2))]
    want = list(tiny.generate_stream([LONG], **long_kw))
    solo = [tiny.generate([p], **kw).codes for p, kw in short]
    with Scheduler(tiny, max_batch=4) as sched:
        stream = sched.stream(LONG, **long_kw)
        futures = [sched.submit(p, **kw) for p, kw in short]
        got = list(stream)
        outs = [f.result(timeout=60) for f in futures]
    assert len(got) == len(want) > 1
    for a, b in zip(got, want):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.audio, b.audio)
    assert torch.equal(torch.cat([c.audio for c in got], -1), tiny.generate([LONG], **long_kw).audio)
    assert all(torch.equal(o.codes, s) for o, s in zip(outs, solo))


def test_stream_refusals_timeout_and_cancel(tiny, monkeypatch):
    with Scheduler(tiny, max_batch=2, max_queue=1) as sched:
        with pytest.raises(ValueError, match="context"):
            sched.stream("x", **TINY, duration=2.0, context=5.0)
        with pytest.raises(ValueError, match="timeout"):
            sched.stream("x", timeout=-1.0, **TINY)
        late = sched.stream("x", timeout=1e-9, **TINY, duration=2.0)
        with pytest.raises(RequestTimeout):
            list(late)
        gate = threading.Event()
        real = tiny.generate_stream

        def slow(*args, **kw):  # every window waits for the gate: the stream is still running when cancelled
            for chunk in real(*args, **kw):
                gate.wait(10)
                yield chunk

        monkeypatch.setattr(tiny, "generate_stream", slow)
        gone = sched.stream("x", **TINY, duration=2.0)
        gone.cancel()
        gate.set()
        with pytest.raises(RuntimeError, match="cancelled"):
            list(gone)
    with pytest.raises(RuntimeError, match="closed"):
        sched.stream("x", **TINY)


def test_a_burst_starts_together_with_each_requests_solo_tokens(tiny, monkeypatch):
    """Requests that start in one iteration start in one `Engine.start_many` (their texts folded in one batched
    product per length), and each still gets its solo run's tokens and audio."""
    started: list[int] = []
    start_many = tiny.start_many

    def recorded(reqs):
        started.append(len(reqs))
        return start_many(reqs)

    monkeypatch.setattr(tiny, "start_many", recorded)
    kw = dict(TINY, duration=0.3)
    prompts = ["one", "two two two", "three three", "four"]
    with Scheduler(tiny, max_batch=4) as sched:
        with sched._cv:  # (reentrant) the loop admits nothing until all four are queued
            futures = [sched.submit(p, seed=i, **kw) for i, p in enumerate(prompts)]
        outs = [f.result(timeout=60) for f in futures]
    assert started == [4]
    for i, (p, out) in enumerate(zip(prompts, outs)):
        alone = tiny.generate([p], seed=i, **kw)
        assert torch.equal(out.codes, alone.codes) and torch.equal(out.audio, alone.audio)


def test_admission_takes_a_burst_of_max_batch_whole(tiny, monkeypatch):
    """Refused only when the batch's free slots and max_queue are used up: max_batch requests into an idle
    scheduler are all taken with any max_queue >= 0, one more is refused, and each finishes."""
    kw = dict(TINY, greedy=True, duration=0.2)
    for max_queue in (0, 2):
        go = blocked_loop(tiny, monkeypatch)
        with Scheduler(tiny, max_batch=4, max_queue=max_queue) as sched:
            futures = [sched.submit(f"p{i}", **kw) for i in range(4 + max_queue)]
            with pytest.raises(QueueFull, match=f"max_queue={max_queue}"):
                sched.submit("one too many", **kw)
            go.set()
            assert all(f.result(timeout=60).codes.shape == (1, 4, 9) for f in futures)


def test_one_text_encoding_per_step_beside_a_running_batch(tiny, monkeypatch):
    """Requests arriving while others decode start one per step (one text encoding between two passes), so a burst
    does not stall the batch for all its texts at once; into an idle loop they all start together."""
    long_kw = dict(TINY, greedy=True, steps=(8, 8, 8, 8), duration=1.0)
    short_kw = dict(TINY, greedy=True, steps=(4, 4, 4, 4), duration=0.4)
    box = {}
    with Scheduler(tiny, max_batch=8) as sched:
        def hook(i):
            if i == 3:
                box["short"] = [sched.submit(f"s{j}", **short_kw) for j in range(3)]
        sizes = count_passes(tiny, monkeypatch, hook)
        sched.submit(LONG, **long_kw).result(timeout=60)
        for f in box["short"]:
            f.result(timeout=60)
    assert sizes[3:7] == [1, 2, 3, 4]


def test_render_runs_in_the_loop_thread(tiny):
    """submit(render=f): the future resolves to f(generation), called by the loop thread; its error is the
    request's own."""
    kw = dict(TINY, greedy=True, duration=0.2)
    seen = []

    def render(out):
        seen.append(threading.current_thread().name)
        return out.audio.shape

    def broken(out):
        raise ValueError("cannot render")

    with Scheduler(tiny) as sched:
        assert sched.submit("a", render=render, **kw).result(timeout=60) == (1, 1, 9 * tiny.codec.config.hop_length)
        with pytest.raises(ValueError, match="cannot render"):
            sched.submit("a", render=broken, **kw).result(timeout=60)
        chunks = list(sched.stream("b", render=render, **dict(kw, duration=2.5)))
    assert len(chunks) > 1 and set(seen) == {"magnet-scheduler"}


def test_streams_have_their_own_limit(tiny, monkeypatch):
    """max_streams streamed requests (started or waiting) at once; past it QueueFull, whatever max_queue says."""
    go = blocked_loop(tiny, monkeypatch)
    real = tiny.generate_stream

    def gated(*args, **kw):
        for chunk in real(*args, **kw):
            go.wait(60)
            yield chunk

    monkeypatch.setattr(tiny, "generate_stream", gated)
    kw = dict(TINY, greedy=True, duration=2.0)
    with Scheduler(tiny, max_queue=64, max_streams=2) as sched:
        streams = [sched.stream("a", **kw), sched.stream("b", **kw)]
        with pytest.raises(QueueFull, match="max_streams=2"):
            sched.stream("c", **kw)
        with pytest.raises(QueueFull, match="max_streams=2"):
            sched.submit("a long piece", **kw).result(timeout=60)
        go.set()
        assert all(len(list(st)) > 1 for st in streams)


def test_default_max_frames_is_sized_from_the_model(tiny):
    with Scheduler(tiny, max_batch=3) as sched:
        assert sched.max_frames == 2 * 3 * tiny.config.max_frames
    with Scheduler(tiny, max_frames=100) as sched:
        assert sched.max_frames == 100


def test_the_callers_openmp_workers_are_released():
    """Scheduler(engine) after the caller ran torch: the caller's OpenMP pool is handed back (it would make libgomp
    throttle the loop thread's pool: module docstring), so only the loop thread holds torch workers."""
    import os

    if "OpenMP" not in torch.__config__.parallel_info() or not hasattr(os, "RTLD_NOLOAD"):
        pytest.skip("torch is not built with OpenMP here")
    from magnet_engine.engine.scheduler import release_openmp_threads

    counts = {}

    def caller():
        torch.set_num_threads(2)
        x = torch.randn(512, 512)
        for _ in range(3):
            x @ x  # a parallel op: this thread gets a pool of workers
        counts["before"] = len(os.listdir("/proc/self/task"))
        counts["released"] = release_openmp_threads()
        threading.Event().wait(0.2)
        counts["after"] = len(os.listdir("/proc/self/task"))

    threads = torch.get_num_threads()
    try:
        t = threading.Thread(target=caller)
        t.start()
        t.join()
    finally:
        torch.set_num_threads(threads)
    assert counts["released"] and counts["after"] == counts["before"] - 1


def test_an_idle_loop_hands_its_openmp_workers_back(tiny):
    """Once a burst is served and the loop waits, its thread's OpenMP workers are handed back too (they would throttle
    torch in other threads: module docstring): the process has num_threads - 1 fewer threads than while the loop
    worked (counted in a render, which the loop thread runs right after a request's codec)."""
    import os

    if "OpenMP" not in torch.__config__.parallel_info() or not hasattr(os, "RTLD_NOLOAD"):
        pytest.skip("torch is not built with OpenMP here")

    def count(_: object = None) -> int:
        return len(os.listdir("/proc/self/task"))

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with Scheduler(tiny) as sched:
            busy = sched.submit("piano", render=count, **dict(TINY, greedy=True)).result()
            idle = []
            for _ in range(50):  # the loop goes idle right after it resolves the future
                idle.append(count())
                if idle[-1] < busy:
                    break
                threading.Event().wait(0.02)
    finally:
        torch.set_num_threads(threads)
    assert idle[-1] == busy - 1, (busy, idle)


def test_a_stream_steps_beside_the_batch(tiny):
    """A long piece's window is cut into decoding steps that interleave with the batch's: a 5-step request submitted
    with it finishes before the piece's first 10-step window does (a whole window per iteration would hold it)."""
    long_kw = dict(TINY, greedy=True, duration=2.0)
    with Scheduler(tiny, max_batch=2) as sched:
        with sched._cv:  # both start in the same iteration
            stream = sched.stream(LONG, **long_kw)
            short = sched.submit("piano", **dict(TINY, greedy=True, steps=(2, 1, 1, 1), duration=0.3))
        first = stream.next_chunk(timeout=120)
        assert short.done() and short.result().codes.shape[-1] == 15
        chunks = [first, *stream]
    want = list(tiny.generate_stream([LONG], **long_kw))
    assert len(chunks) == len(want) > 1
    assert all(torch.equal(a.codes, b.codes) and torch.equal(a.audio, b.audio) for a, b in zip(chunks, want))


def test_forward_packed_neighbours_share_attention_calls(tiny):
    """Neighbours in a pack with equal frames, window and text length share one attention call per layer (a burst
    costs what a static batch's pass costs), and each request's logits are still its own pass's, bit for bit."""
    from magnet_engine.engine.model import Rows, attention_ops
    from magnet_engine.engine.ops import attention

    g = torch.Generator().manual_seed(1)
    cross = [tiny.lm.cross_kv(tiny.text([t])) for t in ("drums", "bass", "a")]
    assert len({c[0][0].shape for c in cross}) == 1, "the texts must have one length for this test"
    shapes = [(1, 6, 1, 0), (1, 6, 1, 1), (2, 6, 1, 2), (2, 6, 1, 0), (1, 9, 1, 1), (1, 9, 0, 2)]
    parts = [Rows(torch.randint(0, 2049, (n, 4, t), generator=g), stage, cross[c]) for n, t, stage, c in shapes]
    calls: list[int] = []

    def counted(q, k, v, window):
        calls.append(q.shape[0])
        return attention(q, k, v, window)

    with torch.no_grad():
        with attention_ops(tiny.lm, counted, counted):
            packed = tiny.lm.forward_packed(parts)
        layers = len(tiny.lm.layers)
        # self-attention: runs (t=6, w) of 6 rows, (t=9, w) and (t=9, full) of one; cross: (t=6) of 4 text rows,
        # (t=9) of 2
        assert sorted(calls) == sorted([6, 1, 1, 4, 2] * layers)
        for p, out in zip(parts, packed):
            assert torch.equal(out, tiny.lm(p.codes, p.stage, p.cross))


def test_codec_of_a_burst_is_one_call(tiny, monkeypatch):
    """`Engine.decode_many`: equal shapes go through one codec call. A plain engine's is the batched decode (audio
    within rounding of each alone); a deterministic one's is `decode_rows` (bit for bit each alone), and a request of
    several rows decodes alone. The scheduler finishes a burst through it, and when the batched call fails each
    request decodes alone."""
    g = torch.Generator().manual_seed(2)
    codes = [torch.randint(0, 2048, (1, 4, t), generator=g) for t in (15, 15, 9, 15)]
    two_rows = torch.randint(0, 2048, (2, 4, 15), generator=g)
    alone = [tiny.decode(c) for c in codes]
    calls: list[int] = []
    rows_calls: list[int] = []
    decode, decode_rows = tiny.codec.decode, tiny.codec.decode_rows

    def counted(c):
        calls.append(c.shape[0])
        return decode(c)

    def rows_counted(c):
        rows_calls.append(c.shape[0])
        return decode_rows(c)

    monkeypatch.setattr(tiny.codec, "decode", counted)
    monkeypatch.setattr(tiny.codec, "decode_rows", rows_counted)
    many = tiny.decode_many([*codes, two_rows])
    assert all(torch.equal(a, b) for a, b in zip(many, alone))
    assert torch.equal(many[-1], decode(two_rows))  # its own decode, its rows together
    assert rows_calls == [3] and sorted(calls) == [1, 2]  # the three of 15 frames; the one of 9 and the 2-row alone
    calls.clear()
    tiny.set_deterministic(False)
    try:
        many = tiny.decode_many(codes)
    finally:
        tiny.set_deterministic(True)
    assert sorted(calls) == [1, 3]
    for a, b in zip(many, alone):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)

    sizes: list[int] = []

    def failing(c):
        sizes.append(len(c))
        raise RuntimeError("batched codec failed")

    monkeypatch.setattr(tiny, "decode_many", failing)
    kw = dict(TINY, greedy=True, duration=0.3)
    with Scheduler(tiny, max_batch=4) as sched:
        with sched._cv:  # all three queued before the loop plans again, whatever the box's load: they start together
            futures = [sched.submit(p, **kw) for p in ("one", "two", "three")]
        outs = [f.result(timeout=60) for f in futures]
    assert sizes == [3]  # the three finished together: one batched call, then each alone
    for p, out in zip(("one", "two", "three"), outs):
        want = tiny.generate([p], **kw)
        assert torch.equal(out.codes, want.codes) and torch.equal(out.audio, want.audio)
