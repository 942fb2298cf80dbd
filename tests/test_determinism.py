"""Same seed, same sound: deterministic decoding (Engine.set_deterministic) is batch-invariant by construction.

A request's tokens do not depend on its batchmates, their number, their arrival order or the thread count, because
every linear of a pass is `invariant_rows` (a long row's GEMM of its own shape, shorter rows in `invariant_linear`'s
GEMMs of one fixed row count) and everything else in a pass is row-local. The references are the requests' solo
runs. Every request has a seed: drawn when none is given, reported, and re-running with it reproduces the request.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from magnet_engine.engine.model import INVARIANT_ROWS, invariant_linear, invariant_rows, linear_rows, row_spans
from magnet_engine.engine.scheduler import Scheduler

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TINY = dict(steps=(3, 2, 2, 2), temperature=3.0, top_p=0.9, top_k=0, cfg=(10.0, 1.0), anneal_temp=True)
LONG = "upbeat electronic dance track with a heavy bass line at 128 bpm"


def requests(n: int) -> list[tuple[str | None, dict]]:
    """n requests of mixed texts, durations, steps, seeds and modes (greedy, top-p, top-k, unguided, stride1)."""
    texts = [LONG, "slow sad piano", None, "drums", "jazz trio", "rain"]
    kinds = [dict(greedy=True), dict(greedy=False, top_p=0.9), dict(greedy=False, top_p=0.0, top_k=5),
             dict(greedy=False, cfg=(1.0,)), dict(greedy=False, span_arrangement="stride1", top_p=0.5)]
    return [(texts[i % len(texts)], dict(TINY, seed=100 + i, duration=(0.2, 0.5, 0.36, 0.6)[i % 4],
                                         steps=((3, 2, 2, 2), (2, 1, 1, 1), (3, 1, 2, 1))[i % 3], **kinds[i % 5]))
            for i in range(n)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_invariant_linear_every_row_count(device: str, dtype: torch.dtype) -> None:
    """Each of 1..32 rows, wherever it sits among other rows (any offset, any total), on 1 and 2 threads, comes out
    as the same bits as the rows alone: invariance from the construction, not from a table of row counts where the
    library happens to agree (plain F.linear is checked beside it, for the record of what it is replacing)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 80, generator=g).to(device, dtype)
    x = torch.randn(32, 80, generator=g).to(device, dtype)
    threads = torch.get_num_threads()
    alone = {m: invariant_linear(x[:m], w) for m in range(1, 33)}
    try:
        for n_threads in (1, 2) if device == "cpu" else (threads,):
            torch.set_num_threads(n_threads)
            for m in range(1, 33):
                for before in (0, 1, 5, INVARIANT_ROWS - 1, INVARIANT_ROWS + 7):
                    for after in (0, 3, 2 * INVARIANT_ROWS):
                        pack = torch.cat([torch.randn(before, 80, generator=g).to(device, dtype), x[:m],
                                          torch.randn(after, 80, generator=g).to(device, dtype)])
                        got = invariant_linear(pack, w)[before:before + m]
                        assert torch.equal(got, alone[m]), (m, before, after, n_threads)
    finally:
        torch.set_num_threads(threads)
    # and it is a linear, as exact as the dtype's own: against the fp64 product, at most twice the error of F.linear
    # in the same dtype on the same (already rounded) inputs, plus one rounding of the largest output
    ref = F.linear(x.double(), w.double())
    plain = (F.linear(x, w).double() - ref).abs().max()
    err = (alone[32].double() - ref).abs().max()
    assert err <= 2 * plain + torch.finfo(dtype).eps * ref.abs().max(), (float(err), float(plain))


def test_invariant_linear_of_strided_rows() -> None:
    """Rows that are a view with gaps (a column slice) or past a whole number of blocks give the same bits as the
    same rows laid out contiguously."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 80, generator=g)
    wide = torch.randn(3 * INVARIANT_ROWS + 5, 100, generator=g)
    x = wide[:, 10:90]  # [M, 80], row stride 100
    assert not x.is_contiguous()
    assert torch.equal(invariant_linear(x, w), invariant_linear(x.contiguous(), w))
    three = x[: 3 * INVARIANT_ROWS].reshape(3, INVARIANT_ROWS, 80)
    assert torch.equal(invariant_linear(three, w).reshape(-1, 48), invariant_linear(x, w)[: 3 * INVARIANT_ROWS])


def test_invariant_rows_gives_a_row_its_own_bits_beside_any_rows() -> None:
    """`invariant_rows` over rows of frames [R, T, in], as a pack lays them out (`linear_rows`: runs of equal frames,
    empty parts included): a row of 1, 63, 64, 65 or 200 frames gets the bits it gets alone, beside rows of other
    lengths, on 1 and 2 threads; and it is a linear, as exact as F.linear."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(96, 80, generator=g)
    widths = [1, 63, 64, 0, 65, 65, 200, 3]
    rows = [torch.randn(t, 80, generator=g) for t in widths]
    alone = [invariant_rows(r[None], w)[0] for r in rows]
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            out = linear_rows(invariant_rows, torch.cat(rows), w, row_spans(widths, widths)).split(widths)
            for t, got, ref in zip(widths, out, alone):
                assert torch.equal(got, ref), (t, n_threads)
    finally:
        torch.set_num_threads(threads)
    x = torch.cat(rows)
    ref = F.linear(x.double(), w.double())
    err = (torch.cat(alone).double() - ref).abs().max()
    plain = (F.linear(x, w).double() - ref).abs().max()
    assert err <= 2 * plain + torch.finfo(torch.float32).eps * ref.abs().max(), (float(err), float(plain))


@pytest.fixture(scope="module")
def solo_runs(tiny) -> list[torch.Tensor]:
    return [tiny.generate([p], **kw).codes for p, kw in requests(16)]


@pytest.mark.parametrize("n", [1, 3, 12, 13, 16])
def test_batch_of_n_equals_solo_runs(tiny, solo_runs, n: int) -> None:
    """n requests at once through the scheduler (mixed lengths and settings, arrival order reversed), each
    token-identical to its solo run."""
    assert tiny.deterministic
    reqs, solo = requests(n), solo_runs[:n]
    with Scheduler(tiny, max_batch=16, max_queue=16) as sched:
        futures = [sched.submit(p, **kw) for p, kw in reversed(reqs)][::-1]
        got = [f.result(timeout=300).codes for f in futures]
    for (p, kw), a, b in zip(reqs, solo, got):
        assert torch.equal(a, b), f"{p!r} {kw}: tokens differ from the solo run"


def test_requests_of_one_shape_run_joined_with_their_solo_tokens(tiny, monkeypatch) -> None:
    """Requests of one shape submitted together run as one joined program each step (`magnet.lockstep`: one per
    shape and sampling mode, built once and kept), with their own texts, seeds and settings: each token-identical
    to its solo run."""
    from magnet_engine.engine import magnet

    joins: list[int] = []
    join = magnet.Decoding.join
    monkeypatch.setattr(magnet.Decoding, "join", classmethod(lambda cls, m: joins.append(len(m)) or join(m)))
    base = dict(TINY, duration=0.5, steps=(3, 2, 2, 2))
    reqs = [(LONG, dict(base, greedy=False, seed=1)), ("slow sad piano", dict(base, greedy=False, seed=2, top_p=0.5)),
            ("drums", dict(base, greedy=False, seed=3, temperature=1.5, cfg=(3.0, 1.0))),
            ("rain", dict(base, greedy=False, seed=4)), ("jazz trio", dict(base, greedy=True)),
            ("a choir", dict(base, greedy=True, cfg=(5.0, 2.0)))]
    solo = [tiny.generate([p], **kw).codes for p, kw in reqs]
    with Scheduler(tiny, max_batch=8) as sched:
        with sched._cv:  # all start in the same iteration
            futures = [sched.submit(p, **kw) for p, kw in reqs]
        got = [f.result(timeout=300).codes for f in futures]
    assert sorted(joins) == [2, 4]
    for (p, kw), a, b in zip(reqs, solo, got):
        assert torch.equal(a, b), f"{p!r} {kw}: tokens differ from the solo run"


def test_thread_count_does_not_change_tokens(tiny) -> None:
    threads = torch.get_num_threads()
    kw = dict(TINY, greedy=False, seed=3, duration=0.8)
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(tiny.generate([LONG], **kw).codes)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*outs)


def test_every_request_has_a_seed(tiny) -> None:
    """Without a seed a request gets a fresh one, reported in its Generation; re-running with it reproduces it."""
    kw = dict(TINY, greedy=False, duration=0.4)
    first, second = tiny.generate(["a piano"], **kw), tiny.generate(["a piano"], **kw)
    assert isinstance(first.seed, int) and first.seed != second.seed
    assert torch.equal(tiny.generate(["a piano"], seed=first.seed, **kw).codes, first.codes)
    with Scheduler(tiny) as sched:
        out = sched.submit("a piano", **kw).result(timeout=120)
    assert isinstance(out.seed, int) and torch.equal(tiny.generate(["a piano"], seed=out.seed, **kw).codes, out.codes)


def test_split_batches_keep_each_prompts_seed(tiny) -> None:
    """`magnet generate --batch-size`: prompt b still draws from seed + b when the request is split (one text
    thrice, so that the split does not change how the texts pad together)."""
    req = tiny.request(["a piano"] * 3, **dict(TINY, greedy=False, seed=11, duration=0.4))
    whole = tiny.generate(req).codes
    parts = torch.cat([tiny.generate(part).codes for part in req.split(2)])
    assert torch.equal(whole, parts)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_dtypes_batched_equal_solo_on_cpu(fixture_dir, dtype: str) -> None:
    """README: deterministic mode holds in fp16 and bf16 too. On a CPU, the LM in that dtype: a few requests at once
    through the scheduler (arrival order reversed), each token-identical to its solo run."""
    import magnet_engine as me

    eng = me.load(fixture_dir, device="cpu", dtype=dtype, deterministic=True)
    assert eng.lm.dtype == getattr(torch, dtype) and eng.deterministic
    reqs = requests(4)
    solo = [eng.generate([p], decode=False, **kw).codes for p, kw in reqs]
    with Scheduler(eng, max_batch=4, max_queue=4) as sched:
        futures = [sched.submit(p, **kw) for p, kw in reversed(reqs)][::-1]
        got = [f.result(timeout=300).codes for f in futures]
    for (p, kw), a, b in zip(reqs, solo, got):
        assert torch.equal(a, b), f"{p!r} {kw}: tokens differ from the solo run"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here): the CPU tests above hold "
                    "the same property; bench/gpu.sh runs this file on the device")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_cuda_batched_equals_solo(fixture_dir, dtype: str) -> None:  # pragma: no cover - GPU only
    import magnet_engine as me

    eng = me.load(fixture_dir, device="cuda", dtype=dtype, deterministic=True)
    reqs = requests(13)
    solo = [eng.generate([p], **kw).codes for p, kw in reqs]
    with Scheduler(eng, max_batch=16) as sched:
        got = [f.result(timeout=300).codes for f in [sched.submit(p, **kw) for p, kw in reqs]]
    assert all(torch.equal(a, b) for a, b in zip(solo, got))


def test_deterministic_is_the_cpu_default(fixture_dir) -> None:
    """`me.load` is deterministic on CPU unless told otherwise (it costs ~8% of a request there: bench/RESULTS.md);
    on CUDA it stays opt-in until measured."""
    from magnet_engine.engine.config import deterministic_by_default

    import magnet_engine as me

    assert deterministic_by_default("cpu") and not deterministic_by_default("cuda")
    assert me.load(fixture_dir, device="cpu").deterministic
    assert not me.load(fixture_dir, device="cpu", deterministic=False).deterministic
