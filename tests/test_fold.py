"""The text folded into the cross-attention's projections (`engine.model.fold_texts`, the CPU path): the same maths as
q projection + attention + out projection, only rounded differently; used where it saves work and the built-in
attention runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_settings
from magnet_engine.engine import model as model_mod
from magnet_engine.engine.model import FoldedText, Rows, TextKV, fold_texts, folding_pays
from magnet_engine.engine.passes import TorchStep
from test_magnet import RUNS

PROMPTS = ["upbeat electronic dance track with a heavy bass line at 128 bpm", "slow sad piano"]


def folded(lm, cond, length=None):
    """Text embeddings [B, L, dim] -> every layer folded at `length` tokens (default: L, nothing padded)."""
    return fold_texts(lm, [cond], cond.shape[1] if length is None else length)[0]


@pytest.mark.parametrize("stage", range(4))
def test_folded_stage_logits_match_the_reference(tiny, settings, expected, stage):
    """The reference implementation's logits, as tests/test_magnet.py checks the unfolded pass against them: two
    prompts of unequal length (zero keys at the padding), conditional and unconditional rows."""
    codes = torch.from_numpy(expected["forward_codes"])
    cross = folded(tiny.lm, tiny.text(settings["prompts"]))
    with torch.no_grad():
        logits = tiny.lm(torch.cat([codes, codes]), stage, cross)
    np.testing.assert_allclose(logits.numpy(), expected[f"forward_logits_stage{stage}"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("run", RUNS)
def test_folded_generation_is_token_exact(tiny, settings, expected, run, monkeypatch):
    """The fixture's texts are too long for folding to pay on the tiny model (L·(H-1) >= dim); folded anyway, every
    generation run gives the reference implementation's tokens exactly."""
    monkeypatch.setattr(model_mod, "folding_pays", lambda length, heads, dim: True)
    assert isinstance(tiny.make_step(tiny.text(settings["prompts"])).cross[0], FoldedText)
    prompt = torch.from_numpy(expected["prompt_codes"]) if run == "gen_continuation" else None
    out = tiny.generate(settings["prompts"], prompt_codes=prompt, **run_settings(settings, run))
    np.testing.assert_array_equal(out.codes.numpy(), expected[run])


def test_folding_where_it_pays_and_the_built_in_attention_runs(tiny):
    """Whether it pays is judged at the length folded: deterministic mode (the `tiny` engine's) pads a text to a
    multiple of TEXT_QUANTUM tokens."""
    lm, step = tiny.lm, TorchStep(tiny.lm)
    dim, heads, quantum = lm.cfg.dim, lm.cfg.num_heads, model_mod.TEXT_QUANTUM
    assert lm.deterministic
    longest = (dim - 1) // (heads - 1) // quantum * quantum  # the longest multiple of the quantum that pays
    short = torch.randn(1, longest, dim)
    long = torch.randn(1, longest + 1, dim)  # pays unpadded, not padded
    assert folding_pays(longest, heads, dim) and not folding_pays(longest + quantum, heads, dim)
    assert folding_pays(longest + 1, heads, dim)
    assert all(isinstance(e, FoldedText) for e in step(short).cross)
    assert all(isinstance(e, TextKV) for e in step(long).cross)
    with model_mod.attention_ops(lm, cross_op=lambda q, k, v, w: model_mod.ops.attention(q, k, v, w)):
        assert all(isinstance(e, TextKV) for e in step(short).cross), "a swapped attention op is used as given"


def test_folding_stays_within_its_memory_budget(tiny, monkeypatch):
    """Folded text is H times the k/v it replaces, held for the whole request: past FOLD_MAX_BYTES it stays k/v."""
    lm, step = tiny.lm, TorchStep(tiny.lm)
    dim = lm.cfg.dim
    text = torch.randn(2, 3, dim)
    folded_bytes = sum(e.scores.nbytes + e.values.nbytes for e in step(text).cross)
    monkeypatch.setattr(model_mod, "FOLD_MAX_BYTES", folded_bytes)
    assert all(isinstance(e, FoldedText) for e in step(text).cross)
    monkeypatch.setattr(model_mod, "FOLD_MAX_BYTES", folded_bytes - 1)
    assert all(isinstance(e, TextKV) for e in step(text).cross)


def test_a_pack_of_folded_and_unfolded_texts_equals_each_own_pass(tiny):
    """Deterministic mode (the `tiny` engine's): requests with folded and unfolded texts in one packed pass, some
    neighbours with equal layouts, each get their own pass's logits bit for bit."""
    lm = tiny.lm
    g = torch.Generator().manual_seed(3)
    conds = [tiny.text([t]) for t in ("drums", "bass", PROMPTS[0])]
    both = folded(lm, tiny.text(PROMPTS))
    crosses = [folded(lm, conds[0]), folded(lm, conds[1]), lm.cross_kv(conds[2]), lm.cross_kv(conds[0]), both]
    shapes = [(1, 6, 1), (1, 6, 1), (2, 6, 1), (1, 9, 0), (4, 9, 2)]
    parts = [Rows(torch.randint(0, lm.cfg.card + 1, (n, lm.cfg.n_q, t), generator=g), stage, cross)
             for (n, t, stage), cross in zip(shapes, crosses)]
    with torch.no_grad():
        for p, out in zip(parts, lm.forward_packed(parts)):
            assert torch.equal(out, lm(p.codes, p.stage, p.cross))


@pytest.mark.parametrize("frames", [1, 7, 50, 64, 65])
def test_folded_rows_batched_equal_each_row_alone(tiny, frames):
    """R text rows' folded attention in one batched GEMM per projection (`folded_rows`, a static batch's or a pack's
    run: here three texts of 3, 5 and 8 tokens padded to one quantum) gives each row the bits of its own row alone
    (`folded_attention`: what a solo request's pass computes), with the row-invariant linear; with the plain one,
    as close to the fp64 result as the rows alone are."""
    import torch.nn.functional as F
    from magnet_engine.engine.model import FoldedText, folded_attention, folded_rows, invariant_linear

    lm = tiny.lm
    attn = lm.layers[0].cross_attention
    heads, d = attn.num_heads, lm.cfg.dim // attn.num_heads
    g = torch.Generator().manual_seed(frames)
    mask = torch.zeros(3, 8)
    for row, length in enumerate((3, 5, 8)):
        mask[row, length:] = float("-inf")
    text = attn.fold(TextKV(*torch.randn(2, 3, heads, 8, d, generator=g)), mask)  # [3, H·8, dim], .., [3, 1, H·8]
    h = torch.randn(3, frames, lm.cfg.dim, generator=g)
    with torch.no_grad():
        for linear in (invariant_linear, F.linear):
            got = folded_rows(h, text, heads, linear, linear)
            alone = torch.stack([folded_attention(h[r], FoldedText(*(x[r] for x in text)), heads, linear)
                                 for r in range(3)])
            if linear is invariant_linear:
                assert torch.equal(got, alone)
            else:
                def lin64(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # the softmax comes out fp32
                    return F.linear(x.double(), w)

                ref = torch.stack([folded_attention(h[r].double(), FoldedText(*(x[r].double() for x in text)), heads,
                                                    lin64) for r in range(3)])
                err, err_alone = ((x.double() - ref).abs().max() for x in (got, alone))
                assert err <= 2 * err_alone + torch.finfo(torch.float32).eps * ref.abs().max(), (err, err_alone)


@pytest.mark.parametrize("quantum", [4, 8])
def test_a_text_padded_to_a_quantum_attends_as_the_text_alone(tiny, quantum):
    """`fold_texts` at a length past the text's pads it with zero keys under a -inf mask: the padding takes no
    softmax weight, so the folded branch is the unpadded text's attention (q projection, attention over its own L
    keys, out projection) up to fp32 rounding, as the unpadded fold is, for lengths around the quantum."""
    import torch.nn.functional as F
    from magnet_engine.engine.model import folded_attention

    lm = tiny.lm
    attn = lm.layers[0].cross_attention
    heads, dim = attn.num_heads, lm.cfg.dim
    d = dim // heads
    g = torch.Generator().manual_seed(quantum)
    h = torch.randn(5, dim, generator=g, dtype=torch.float64)

    def lin64(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x.double(), w.double())

    for length in (1, 3, quantum - 1, quantum, quantum + 1):
        cond = torch.randn(1, length, dim, generator=g)
        width = length + (-length % quantum)
        padded, unpadded = folded(lm, cond, width)[0], folded(lm, cond)[0]
        assert padded.scores.shape == (1, heads * width, dim) and padded.values.shape == (1, dim, heads * width)
        assert int(torch.isinf(padded.mask).sum()) == heads * (width - length)
        assert not torch.isinf(unpadded.mask).any()
        with torch.no_grad():
            got, ungot = (folded_attention(h, FoldedText(*(x[0].double() for x in t)), heads, lin64)
                          for t in (padded, unpadded))
            q = lin64(h, attn.in_proj_weight[:dim]).view(5, heads, d).transpose(0, 1)  # [H, 5, D]
            k, v = (t[0].double() for t in attn.kv(cond))  # [H, L, D]
            o = torch.softmax(q @ k.transpose(1, 2) / d ** 0.5, dim=-1) @ v
            ref = lin64(o.transpose(0, 1).reshape(5, dim), attn.out_proj.weight)
        # fp32 dot products of length <= dim round by at most ~dim·eps relative (the worst case, γ_dim); a padded key
        # that took softmax weight would move the output by ~1/(L+1) of its scale
        tol = dim * torch.finfo(torch.float32).eps * float(ref.abs().max())
        assert float((got - ref).abs().max()) <= tol and float((ungot - ref).abs().max()) <= tol, length


def test_requests_started_together_get_the_texts_each_gets_alone(tiny):
    """`TorchStep.many` (the scheduler's burst): texts of one folded length are folded in one batched product, each
    request's folded text bit for bit what its own start gives (deterministic mode, the `tiny` engine's: lengths
    padded to the quantum, so 1..8 tokens share one product); a text that stays k/v (too long to pay) too."""
    lm = tiny.lm
    dim, heads = lm.cfg.dim, lm.cfg.num_heads
    g = torch.Generator().manual_seed(0)
    too_long = dim // (heads - 1) + 1
    conds = [torch.randn(rows, length, dim, generator=g) for rows, length in
             ((1, 3), (1, 8), (2, 5), (1, 9), (1, too_long), (1, 1))]
    step = TorchStep(lm)
    together = step.many(conds)
    for cond, got in zip(conds, together):
        alone = step(cond).cross
        assert type(got.cross[0]) is type(alone[0])
        assert all(torch.equal(x, y) for a, b in zip(got.cross, alone) for x, y in zip(a, b))
    assert isinstance(together[4].cross[0], TextKV) and isinstance(together[0].cross[0], FoldedText)


def test_a_runs_joined_texts_are_kept_while_it_keeps_its_requests(tiny):
    """`JoinedTexts`: a run's folded texts are concatenated once and reused while the same requests share it, let go
    after a pass that did not use them; passes through it give each request its own pass's logits, as without."""
    from magnet_engine.engine.model import JoinedTexts

    lm = tiny.lm
    a, b, c = (folded(lm, tiny.text([t]), 8) for t in ("drums", "bass", "flute"))
    joined = JoinedTexts()
    first = joined.join([a[0], b[0]])
    assert joined.join([a[0], b[0]]) is first and joined.join([a[0]]) is a[0]
    assert all(torch.equal(x, torch.cat([y, z])) for x, y, z in zip(first, a[0], b[0]))
    joined.end_pass()
    assert joined.join([a[0], b[0]]) is first
    joined.end_pass()
    joined.join([a[0], c[0]])  # b left the run
    joined.end_pass()
    assert len(joined.kept) == 1 and joined.join([a[0], b[0]]) is not first

    g = torch.Generator().manual_seed(0)
    joined = JoinedTexts()
    for crosses in ([a, b], [a, b], [a, c], [a, b, c]):
        parts = [Rows(torch.randint(0, lm.cfg.card + 1, (1, lm.cfg.n_q, 6), generator=g), 0, x) for x in crosses]
        with torch.no_grad():
            for p, out in zip(parts, lm.forward_packed(parts, None, joined)):
                assert torch.equal(out, lm(p.codes, p.stage, p.cross))


@pytest.mark.parametrize("frames", [65, 130, 498])
def test_a_row_longer_than_a_block_gets_its_own_bits_in_a_pack_and_on_any_thread_count(tiny, frames):
    """Deterministic mode: a text row of more frames than one block runs its folded attention as plain GEMMs of its
    own shape (`folded_rows`), so beside rows of other lengths and texts, and on 1 or 2 threads, it gets the bits
    it gets alone."""
    from magnet_engine.engine.model import folded_rows, invariant_linear

    lm = tiny.lm
    attn = lm.layers[0].cross_attention
    g = torch.Generator().manual_seed(frames)
    conds = [torch.randn(1, length, lm.cfg.dim, generator=g) for length in (3, 8, 5)]
    texts = [folded(lm, c, 8)[0] for c in conds]
    h = torch.randn(3, frames, lm.cfg.dim, generator=g)
    threads = torch.get_num_threads()
    with torch.no_grad():
        alone = [folded_rows(h[i:i + 1], texts[i], attn.num_heads, invariant_linear, invariant_linear)
                 for i in range(3)]
        try:
            for n_threads in (1, 2):
                torch.set_num_threads(n_threads)
                together = folded_rows(h, FoldedText(*(torch.cat(x) for x in zip(*texts))), attn.num_heads,
                                       invariant_linear, invariant_linear)
                for i in range(3):
                    assert torch.equal(together[i:i + 1], alone[i]), (i, n_threads)
        finally:
            torch.set_num_threads(threads)
