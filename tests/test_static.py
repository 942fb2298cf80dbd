"""The static decoding program (engine.magnet): no host synchronisation in the loop, one program replayed for many
requests (engine.graph; on CPU the replay runs eagerly on the same static buffers), and a step that compiles whole.

The token references are the solo eager runs (which tests/test_magnet.py holds against the reference fixture).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_settings
from magnet_engine.engine import magnet
from magnet_engine.engine.api import GraphedPass
from magnet_engine.engine.graph import ProgramCache
from magnet_engine.engine.masking import chunk_frames
from magnet_engine.engine.sampling import sample_ref
from magnet_engine.engine.scheduler import start_request
from torch.utils._python_dispatch import TorchDispatchMode

SYNCS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.item.default"}
TINY = dict(steps=(3, 2, 2, 2), temperature=3.0, top_p=0.9, top_k=0, cfg=(10.0, 1.0), anneal_temp=True, duration=0.6)


class OpLog(TorchDispatchMode):
    """Every aten op dispatched while active (what `bench overhead` counts)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kw", [dict(TINY, greedy=False, seed=3),
                                dict(TINY, greedy=False, seed=4, top_p=0.0, top_k=5, span_arrangement="stride1"),
                                dict(TINY, greedy=True, prompt_codes=True)], ids=["top_p", "top_k-stride1", "prompt"])
def test_no_host_sync_inside_the_loop(tiny, kw):
    """After the program is built (noise drawn, schedule on the device), no step reads the device: no .item(),
    .tolist() or nonzero, whatever the sampling mode, span arrangement or prompt."""
    kw = dict(kw)
    prompt = torch.randint(0, 2048, (1, 4, 7)) if kw.pop("prompt_codes", False) else None
    req = tiny.request(["a piano"], **kw)
    step = tiny.make_step(tiny.text(list(req.prompts)))
    dec = magnet.Decoding(tiny.config, req.gen, 1, tiny.device, prompt,
                          magnet.row_generators(req.gen.seed, 1, tiny.device), step=step)
    with torch.no_grad(), OpLog() as log:
        while not dec.finished:
            magnet.decode_step(tiny.lm_pass, tiny.sample, [dec])
    assert log.ops and not SYNCS & set(log.ops), sorted(SYNCS & set(log.ops))
    want = tiny.generate(["a piano"], prompt_codes=prompt, **kw).codes
    assert torch.equal(dec.codes, want)


def replayed(eng, requests: list[tuple[list[str], dict]]) -> list[torch.Tensor]:
    """The requests' tokens through captured programs (Engine.graph; eager replay on a CPU)."""
    eng.graph = True  # set_graph refuses a CPU engine; the replay contract is the same without a graph
    try:
        return [eng.generate(prompts, **kw).codes for prompts, kw in requests]
    finally:
        eng.graph = False


def test_program_replays_each_request(tiny, expected, settings, monkeypatch):
    """One program per shape serves every request of that shape: the second, third, ... request's numbers
    (text, seed, guidance, temperature, nucleus, prompt) reach it only through the inputs copied in, and its tokens
    equal the eager run's. The fixture's greedy runs too. The 8 requests have 6 shapes: 6 programs, no more."""
    prompts = settings["prompts"]
    same_len = ["a piano", "a cello"]  # equal token counts (6 each; "a drums" has 3): one text length, one program
    requests = [(same_len[:1], dict(TINY, greedy=False, seed=1)),
                (same_len[1:], dict(TINY, greedy=False, seed=2, temperature=1.5, top_p=0.5, cfg=(3.0, 1.0))),
                (same_len[:1], dict(TINY, greedy=False, seed=3, top_p=0.0, top_k=7)),
                (same_len[:1], dict(TINY, greedy=True, prompt_codes=torch.randint(0, 2048, (1, 4, 7)))),
                (same_len[1:], dict(TINY, greedy=True, prompt_codes=torch.randint(0, 2048, (1, 4, 7))))]
    for run in ("gen_nonoverlap_max", "gen_stride1", "gen_continuation"):
        kw = run_settings(settings, run)
        if run == "gen_continuation":
            kw["prompt_codes"] = torch.from_numpy(expected["prompt_codes"])
        requests.append((prompts, kw))
    eager = [tiny.generate(p, **kw).codes for p, kw in requests]
    monkeypatch.setattr(tiny, "programs", ProgramCache())  # none of another test's programs
    got = replayed(tiny, requests)
    for (p, kw), a, b in zip(requests, eager, got):
        assert torch.equal(a, b), f"{p} {kw}: the replayed program's tokens differ from the eager run"
    for run, codes in zip(("gen_nonoverlap_max", "gen_stride1", "gen_continuation"), got[-3:]):
        np.testing.assert_array_equal(codes.numpy(), expected[run])
    # 6 shapes (Decoding.shape_key): top-p and top-k requests are different programs (the sampler's code differs),
    # the two prompt lengths alike; requests 2 and 5 replay those of 1 and 4 (held: the cache keeps the last 4)
    assert tiny.programs.captures == 6


def test_ar_program_replays_each_request(fixture_dir):
    """The AR baseline's whole frame loop as one program per shape (mode "program"): the same tokens as the eager
    loop for requests with other seeds and settings, the reference's greedy run among them."""
    import magnet_engine as me

    mg = me.load(fixture_dir / "musicgen_state_dict.bin", device="cpu")
    want = np.load(fixture_dir / "expected_musicgen.npz")["gen_greedy"]
    frames = want.shape[-1]
    kw = dict(duration=frames / mg.config.frame_rate)
    prompts = ["a piano", "a drums"]
    requests = [(prompts, dict(kw, greedy=True, cfg=(3.0, 3.0))),
                (prompts, dict(kw, greedy=False, seed=5, temperature=1.0, top_k=20, top_p=0.0)),
                (prompts, dict(kw, greedy=False, seed=6, temperature=0.7, top_k=20, top_p=0.0, cfg=(2.0, 2.0)))]
    eager = [mg.generate(p, **k).codes for p, k in requests]
    got = replayed(mg, requests)
    for a, b in zip(eager, got):
        assert torch.equal(a, b)
    assert mg.programs.captures == 2  # greedy and top-k: two shapes


LONGER = dict(TINY, steps=(6, 4, 4, 4))  # stretches of steps in which a batch keeps its layout
MIXED = [("a piano", dict(LONGER, greedy=False, seed=1)),
         ("upbeat electronic dance track", dict(LONGER, greedy=False, seed=2, temperature=1.5, cfg=(3.0, 1.0))),
         (None, dict(LONGER, greedy=False, seed=3, top_p=0.0, top_k=5, span_arrangement="stride1")),
         ("drums", dict(LONGER, greedy=True, steps=(2, 1, 3, 2), duration=0.4))]


def graphed(eng, monkeypatch) -> GraphedPass:
    """`eng` as `set_graph(True)` leaves it, on a CPU (where set_graph refuses: the replay contract is the same)."""
    monkeypatch.setattr(eng, "graph", True)
    monkeypatch.setattr(eng, "lm_pass", GraphedPass(eng.lm, eng.device))
    return eng.lm_pass


def joined(eng, requests: list, join_at: int = 3) -> list[torch.Tensor]:
    """The scheduler's loop without its thread: every request but the last from the first pass, the last joining at
    pass `join_at`, one `decode_step` through `eng.lm_pass` per pass -> each request's codes."""
    with torch.no_grad():
        decs = [start_request(eng, p, eng.settings(**kw)) for p, kw in requests]
        live, passes = decs[:-1], 0
        while live or passes <= join_at:
            live += decs[-1:] if passes == join_at else []
            magnet.decode_step(eng.lm_pass, eng.sample, live)
            live, passes = [d for d in live if not d.finished], passes + 1
    return [d.codes for d in decs]


def test_pass_graphs(tiny, monkeypatch):
    """The scheduler's LM pass captured per layout (GraphedPass): a layout seen on two passes in a row is captured
    and replayed while it recurs, one seen once runs eagerly, and every request keeps its solo tokens (a
    deterministic engine). A second wave of the same shapes with other numbers replays the first's graphs."""
    wave2 = [(p, dict(kw, seed=kw.get("seed", 0) + 10, cfg=(4.0, 2.0))) for p, kw in MIXED]
    solo = [[tiny.generate([p], **kw).codes for p, kw in wave] for wave in (MIXED, wave2)]
    gp = graphed(tiny, monkeypatch)
    counts = []
    for requests, want in zip((MIXED, wave2), solo):
        for (p, kw), got, codes in zip(requests, joined(tiny, requests), want):
            assert torch.equal(got, codes), f"{p!r} {kw}: tokens differ from the solo run"
        counts.append((gp.graphs.captures, gp.passes["eager"], gp.passes["graph"]))
    (captures, eager, graph), again = counts
    # one capture per stretch of steps in which no request joins, leaves or changes codebook
    assert captures >= 2 and graph > captures and eager >= 2
    # the second wave captures nothing, and replays a cached layout from its first pass on (where the first wave ran
    # that pass eagerly)
    assert again == (captures, eager + eager - captures, graph + graph + captures)


def test_scheduler_pass_graphs(tiny, monkeypatch):
    """Through the scheduler's thread: requests arriving as they may keep their solo tokens over graphed passes."""
    from magnet_engine.engine.scheduler import Scheduler

    solo = [tiny.generate([p], **kw).codes for p, kw in MIXED]
    gp = graphed(tiny, monkeypatch)
    with Scheduler(tiny, max_batch=8) as sched:
        futures = [sched.submit(p, **kw) for p, kw in MIXED]
        for (p, kw), f, codes in zip(MIXED, futures, solo):
            assert torch.equal(f.result(timeout=120).codes, codes), f"{p!r} {kw}: tokens differ from the solo run"
    assert gp.passes["graph"] + gp.passes["eager"] == sum(sched.batch_sizes.values())
    # a request keeps its layout through the steps of a codebook (6 or 4 here): some passes replay a captured graph
    assert gp.passes["graph"] > gp.graphs.captures > 0


def test_decode_together(tiny, monkeypatch):
    """Requests that start together (static batching), decoded to their end as one program (captured whole per
    cohort shape on CUDA): each request's solo tokens, eagerly and through the program; a second cohort of the same
    shapes with other numbers replays it."""
    def cohort(requests):
        with torch.no_grad():
            return [start_request(tiny, p, tiny.settings(**kw)) for p, kw in requests]

    solo = [tiny.generate([p], **kw).codes for p, kw in MIXED]
    for got, want in zip(tiny.decode_together(cohort(MIXED)), solo):
        assert torch.equal(got, want)
    wave2 = [(p, dict(kw, seed=kw.get("seed", 0) + 10, temperature=2.0)) for p, kw in MIXED]
    solo2 = [tiny.generate([p], **kw).codes for p, kw in wave2]
    graphed(tiny, monkeypatch)
    before = tiny.programs.captures
    for requests, want in [(MIXED, solo), (wave2, solo2)]:
        for got, codes in zip(tiny.decode_together(cohort(requests)), want):
            assert torch.equal(got, codes)
    assert tiny.programs.captures == before + 1


def test_set_graph_needs_cuda(tiny):
    from magnet_engine.engine.config import SettingError

    with pytest.raises(SettingError, match="CUDA"):
        tiny.set_graph(True)
    assert tiny.set_graph(False).graph is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (none here): on CPU the "
                    "replay contract is tested by test_program_replays_each_request")
def test_cuda_graph_token_equal(fixture_dir, expected, settings):  # pragma: no cover - GPU only
    import magnet_engine as me

    eng = me.load(fixture_dir, device="cuda", dtype="float32")
    graphed = me.load(fixture_dir, device="cuda", dtype="float32", graph=True)
    for run in ("gen_nonoverlap_max", "gen_stride1", "gen_nonoverlap_prod"):
        kw = run_settings(settings, run)
        for _ in range(2):  # capture, then replay
            np.testing.assert_array_equal(graphed.generate(settings["prompts"], **kw).codes.cpu().numpy(),
                                          eng.generate(settings["prompts"], **kw).codes.cpu().numpy())
    kw = dict(TINY, greedy=False, seed=9)
    assert torch.equal(graphed.generate(["a piano"], **kw).codes, eng.generate(["a piano"], **kw).codes)


def test_step_compiles_whole(tiny):
    """torch.compile(fullgraph=True) of a decoding step (re-mask, LM pass, guidance and sampling, span scores)
    compiles without a graph break (fullgraph raises on one), and the compiled step equals the eager one. (A stage
    and step index are host facts of the static program: each step of a program is its own graph, so one step is
    compiled here, the first, which also resets the stage.)"""
    torch._dynamo.reset()
    req = tiny.request(["a piano"], **dict(TINY, greedy=False, seed=3))

    def program() -> magnet.Decoding:
        step = tiny.make_step(tiny.text(list(req.prompts)))
        return magnet.Decoding(tiny.config, req.gen, 1, tiny.device, None,
                               magnet.row_generators(req.gen.seed, 1, tiny.device), step=step)

    compiled, eager = program(), program()
    with torch.no_grad():
        torch.compile(lambda: magnet.decode_step(magnet.each_alone, sample_ref, [compiled]), fullgraph=True)()
        magnet.decode_step(magnet.each_alone, sample_ref, [eager])
    assert compiled.done == eager.done == 1
    assert torch.equal(compiled.codes, eager.codes) and torch.equal(compiled.row, eager.row)
    torch.testing.assert_close(compiled.scores, eager.scores)  # fused kernels may round a score differently


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (none here): on CPU the "
                    "replay contract is tested by test_pass_graphs and test_decode_together")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_pass_graphs_token_equal(fixture_dir, dtype):  # pragma: no cover - GPU only
    """On the GPU, a deterministic engine's graphed passes and cohort programs give each request its solo tokens."""
    import magnet_engine as me

    eng = me.load(fixture_dir, device="cuda", dtype=dtype, deterministic=True)
    solo = [eng.generate([p], **kw).codes for p, kw in MIXED]
    eng.set_graph(True)
    for _ in range(2):  # capture, then replay
        for got, want in zip(joined(eng, MIXED), solo):
            assert torch.equal(got, want)
        with torch.no_grad():
            decs = [start_request(eng, p, eng.settings(**kw)) for p, kw in MIXED]
        for got, want in zip(eng.decode_together(decs), solo):
            assert torch.equal(got, want)
    assert eng.lm_pass.passes["graph"] > eng.lm_pass.graphs.captures > 0


def test_chunk_frames_lists_the_chunks_frames_in_order():
    """chunk_frames: exactly n chunks per row -> their frames, in index order (as nonzero would list them)."""
    g = torch.Generator().manual_seed(0)
    for n in (1, 5, 17):
        chunks = torch.rand(3, 17, generator=g).argsort(-1) < n  # [3, 17], n true per row
        got = chunk_frames(chunks, n, 3)
        want = chunks.repeat_interleave(3, dim=-1).nonzero()[:, 1].view(3, -1)
        assert torch.equal(got, want)


def _full_width(dec: magnet.Decoding) -> magnet.Decoding:
    dec.sampled_chunks = None  # every step samples all T frames, as on a GPU
    return dec


@pytest.mark.parametrize("kw", [dict(TINY, greedy=False, seed=3),
                                dict(TINY, greedy=False, seed=4, top_p=0.0, top_k=5, span_scoring="prod"),
                                dict(TINY, greedy=False, seed=5, top_p=0.0, cfg=(1.0, 1.0)),
                                dict(TINY, greedy=True, prompt_codes=True)],
                         ids=["top_p", "top_k-prod", "multinomial-unguided", "greedy-prompt"])
def test_sampling_the_remasked_frames_only_is_exact(tiny, kw):
    """On a CPU a nonoverlap step samples only the frames of the chunks it re-masks (Decoding.index): every step's
    codes and span scores are those of the same program sampling all T frames, bit for bit (a prompt of 7 frames
    leaves a chunk half prompt, whose prompt frames' probabilities the scores read); later steps sample fewer."""
    kw = dict(kw)
    prompt = torch.randint(0, 2048, (2, 4, 7)) if kw.pop("prompt_codes", False) else None
    req = tiny.request(["a piano", "a drums"], **kw)
    step = tiny.make_step(tiny.text(list(req.prompts)))

    def program() -> magnet.Decoding:
        return magnet.Decoding(tiny.config, req.gen, 2, tiny.device, prompt,
                               magnet.row_generators(req.gen.seed, 2, tiny.device), step=step)

    subset, full = program(), _full_width(program())
    widths = []
    with torch.no_grad():
        while not subset.finished:
            magnet.decode_step(tiny.lm_pass, tiny.sample, [subset])
            magnet.decode_step(tiny.lm_pass, tiny.sample, [full])
            widths.append(subset.width)
            assert torch.equal(subset.codes, full.codes) and torch.equal(subset.scores, full.scores)
    assert full.width == full.frames and min(widths) < subset.frames
    assert not (subset.codes == subset.mask_id).any()


def test_a_cpu_step_runs_the_last_layer_on_its_sampled_frames_only(tiny, monkeypatch):
    """The step above is bit for bit the full-width one; here, that its LM pass did compute fewer frames: the head
    (after the last layer's cross-attention and MLP) sees every frame at a stage's first step, fewer later."""
    widths: list[int] = []
    head = tiny.lm.head

    def counted(x: torch.Tensor, stage: int) -> torch.Tensor:
        widths.append(x.shape[1])  # [N, n, dim]
        return head(x, stage)

    monkeypatch.setattr(tiny.lm, "head", counted)
    out = tiny.generate(["a piano"], **dict(TINY, greedy=False, seed=1))
    frames = out.codes.shape[-1]
    assert widths[0] == frames and min(widths) < frames and len(widths) == sum(TINY["steps"])


def test_grouped_requests_of_unequal_widths_sample_their_own_frames(tiny):
    """decode_step over requests at different steps groups them by how many frames each samples: each request's
    codes are its solo program's sampling all T frames."""
    requests = [("a piano", dict(LONGER, greedy=False, seed=1)),
                ("a cello", dict(LONGER, greedy=False, seed=2, temperature=1.5, cfg=(3.0, 1.0))),
                ("drums", dict(LONGER, greedy=True, steps=(2, 1, 3, 2)))]
    with torch.no_grad():
        solo = []
        for p, kw in requests:
            dec = _full_width(start_request(tiny, p, tiny.settings(**kw)))
            while not dec.finished:
                magnet.decode_step(tiny.lm_pass, tiny.sample, [dec])
            solo.append(dec.codes)
        decs = [start_request(tiny, p, tiny.settings(**kw)) for p, kw in requests]
        live, passes, mixed = decs[:1], 0, False
        while live or passes <= 2:
            live += decs[1:] if passes == 2 else []  # the others join two steps late
            magnet.decode_step(tiny.lm_pass, tiny.sample, live)
            mixed |= len({d.width for d in live}) > 1
            live, passes = [d for d in live if not d.finished], passes + 1
    assert mixed
    for got, want in zip([d.codes for d in decs], solo):
        assert torch.equal(got, want)


def test_requests_in_lockstep_share_one_program_and_keep_their_solo_tokens(tiny):
    """Requests of one shape at one step run joined (`magnet.lockstep`: one re-mask, one set of sampler inputs and one
    advance for all of them, vLLM's persistent batch), each with its own text, settings and noise: each request's
    codes are its solo run's, also after one runs a step alone (a retry) and when one leaves mid-way (a timeout:
    the others are joined anew). Span scores whose rounding could move with a row's place (−log p) are never
    joined."""
    base = dict(LONGER, greedy=False)
    requests = [("a piano", dict(base, seed=1)), ("a cello", dict(base, seed=2, temperature=1.5, cfg=(3.0, 1.0))),
                ("drums and a walking bass line", dict(base, seed=3, top_p=0.5)), ("a choir", dict(base, seed=4))]
    with torch.no_grad():
        solo = [tiny.generate([p], **kw).codes for p, kw in requests]
        decs = [start_request(tiny, p, tiny.settings(**kw)) for p, kw in requests]
        units = magnet.lockstep(decs)
        assert len(units) == 1 and [m for m, _ in units[0].members] == decs
        magnet.decode_step(tiny.lm_pass, tiny.sample, decs)
        assert magnet.lockstep(decs) == units  # the same joined program while they stay together
        magnet.decode_step(tiny.lm_pass, tiny.sample, decs[2:3])  # a retry: alone, on its rows of the joined state
        magnet.decode_step(tiny.lm_pass, tiny.sample, [d for d in decs if d is not decs[2]])
        live = decs[1:]  # the first leaves
        while live:
            magnet.decode_step(tiny.lm_pass, tiny.sample, live)
            live = [d for d in live if not d.finished]
    for got, want in zip(decs[1:], solo[1:]):
        assert torch.equal(got.codes, want)
        assert got.cohort is None and got.codes.data_ptr() == got.own["codes"].data_ptr()  # its own buffers again
    for scoring in (dict(span_arrangement="stride1"), dict(span_scoring="prod")):
        apart = [start_request(tiny, p, tiny.settings(**dict(base, **scoring, seed=1))) for p in ("a piano", "a cello")]
        assert magnet.lockstep(apart) == apart
