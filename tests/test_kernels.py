"""Triton kernels vs their PyTorch references, run by Triton's interpreter on CPU tensors (no GPU needed).

Attention tolerance, per output: max|kernel - ref32| <= 2 * max|torch_same_dtype - ref32| + 1e-3, where ref32 is
`attention_ref` in fp32 on the same (already rounded) inputs and torch_same_dtype is `attention_ref` run in the
input dtype. A kernel may be as inexact as PyTorch's own low-precision path, twice over, plus a small floor.

Sampling: with the same uniform noise the kernel must pick the very same tokens as `sample_ref` (greedy,
multinomial, top-k, top-p), with probabilities within 1e-5 relative; a chi-square test checks the distribution.
"""
from __future__ import annotations

import os

# Must precede the first `import triton` anywhere in the process: triton reads it when a kernel is decorated.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed: pip install 'triton>=3.2' (extra [triton])")

import magnet_engine.kernels.attention as kattn  # noqa: E402
import magnet_engine.kernels.sampling as ksamp  # noqa: E402
from magnet_engine.engine.ops import band_mask  # noqa: E402
from magnet_engine.engine.sampling import StepSampling  # noqa: E402

if not (kattn.INTERPRETED and ksamp.INTERPRETED):
    # triton (its own tl.cumsum etc. included) was imported earlier in this process without the variable, and
    # reloading our modules cannot fix triton's: set it before any import instead
    raise RuntimeError("triton was imported before tests/test_kernels.py set TRITON_INTERPRET=1; add "
                       "os.environ.setdefault('TRITON_INTERPRET', '1') at the top of tests/conftest.py")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _qkv(n: int, h: int, tq: int, tk: int, d: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, h, t, d, generator=g).to(dtype) for t in (tq, tk, tk))


def _check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> None:
    out = kattn.attention(q, k, v, window)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref32 = kattn.attention_ref(q.float(), k.float(), v.float(), window)
    same = kattn.attention_ref(q, k, v, window).float()
    err = (out.float() - ref32).abs().max().item()
    torch_err = (same - ref32).abs().max().item()
    bound = 2.0 * torch_err + 1e-3
    assert err <= bound, f"max error {err:.3g} > {bound:.3g} (torch {q.dtype} error {torch_err:.3g})"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("window", [None, 5, 0, 1])
@pytest.mark.parametrize("t", [7, 498, 500])
def test_self_attention(t: int, window: int | None, dtype: torch.dtype) -> None:
    # T = 7: several rows and heads, one partial block; T = 498/500: many blocks, 498 = partial last block
    n, h = (3, 2) if t == 7 else (1, 1)
    _check_attention(*_qkv(n, h, t, t, 64, dtype, seed=t + (window or -1)), window)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("tk", [1, 13, 40])
def test_cross_attention(tk: int, n: int, dtype: torch.dtype) -> None:
    _check_attention(*_qkv(n, 2, 500 if n == 1 else 7, tk, 64, dtype, seed=tk), None)


@pytest.mark.parametrize("window", [None, 5])
def test_attention_30s(window: int | None) -> None:
    # T = 1500 (30 s): ~3 s for the full case in the interpreter, so one head, one dtype
    _check_attention(*_qkv(1, 1, 1500, 1500, 64, torch.float16, seed=1500), window)


@pytest.mark.parametrize("d", [16, 32, 128])
def test_head_dims(d: int) -> None:
    _check_attention(*_qkv(2, 2, 70, 70, d, torch.float16, seed=d), 3)
    _check_attention(*_qkv(2, 2, 70, 9, d, torch.float16, seed=d), None)


def test_band_is_the_band() -> None:
    # the band against a dense masked SDPA (not only against band_attention, which shares its author's idea)
    q, k, v = _qkv(1, 2, 100, 100, 64, torch.float32, seed=7)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(100, 5))
    torch.testing.assert_close(kattn.attention(q, k, v, 5), dense, rtol=1e-5, atol=1e-5)
    # a band as wide as the sequence is full attention
    torch.testing.assert_close(kattn.attention(q, k, v, 99), kattn.attention(q, k, v, None), rtol=1e-5, atol=1e-5)


def test_attention_strided_inputs() -> None:
    # the model's heads come from a [N, T, H, D] projection: transposed views, last dim still contiguous
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 33, 3, 64, generator=g).to(torch.float16).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    _check_attention(q, k, v, 5)
    _check_attention(q, k, v, None)


def test_attention_validation() -> None:
    q, k, v = _qkv(1, 2, 8, 8, 64, torch.float32, seed=0)
    with pytest.raises(ValueError, match="4-D"):
        kattn.attention(q[0], k[0], v[0])
    with pytest.raises(TypeError, match="dtypes differ"):
        kattn.attention(q, k.half(), v)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        kattn.attention(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="torch.Tensor"):
        kattn.attention(q, k.numpy(), v)
    with pytest.raises(ValueError, match="contiguous"):
        kattn.attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))
    with pytest.raises(ValueError, match="Tq == Tk"):
        kattn.attention(q, k[:, :, :5], v[:, :, :5], 2)
    with pytest.raises(ValueError, match=">= 0"):
        kattn.attention(q, k, v, -1)
    with pytest.raises(TypeError, match="window"):
        kattn.attention(q, k, v, 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="head dim 48"):
        kattn.attention(*_qkv(1, 1, 8, 8, 48, torch.float32, seed=0))
    with pytest.raises(ValueError, match="agree"):
        kattn.attention(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="same shape"):
        kattn.attention(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match="no keys"):
        kattn.attention(q, k[:, :, :0], v[:, :, :0])
    assert kattn.attention(q[:, :, :0], k, v).shape == (1, 2, 0, 64)


# ---------------------------------------------------------------------------------------------------- sampling

GREEDY = StepSampling(cfg_coef=3.0, temperature=1.0, top_k=0, top_p=0.0, greedy=True)
MODES = {
    "greedy": GREEDY,
    "greedy-cold": StepSampling(cfg_coef=10.0, temperature=0.01, top_k=0, top_p=0.0, greedy=True),
    "multinomial": StepSampling(cfg_coef=3.0, temperature=0.7, top_k=0, top_p=0.0, greedy=False),
    "multinomial-cold": StepSampling(cfg_coef=10.0, temperature=0.01, top_k=0, top_p=0.0, greedy=False),
    "top_k1": StepSampling(cfg_coef=3.0, temperature=1.0, top_k=1, top_p=0.0, greedy=False),
    "top_k5": StepSampling(cfg_coef=3.0, temperature=1.0, top_k=5, top_p=0.0, greedy=False),
    "top_k_all": StepSampling(cfg_coef=1.0, temperature=3.0, top_k=37, top_p=0.0, greedy=False),
    "top_p0.3": StepSampling(cfg_coef=3.0, temperature=1.0, top_k=0, top_p=0.3, greedy=False),
    "top_p0.9": StepSampling(cfg_coef=3.0, temperature=2.0, top_k=250, top_p=0.9, greedy=False),  # top_p wins
    "top_p1": StepSampling(cfg_coef=3.0, temperature=1.0, top_k=0, top_p=1.0, greedy=False),
}


def _step_inputs(b: int, t: int, v: int, dtype: torch.dtype, seed: int, ties: bool = False) -> tuple[torch.Tensor, ...]:
    """cond, uncond [B, T, V]; current [B, T] with ~70% masked (mask_id = V); uniform [B, T]."""
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct logit values: many exactly tied probabilities
        cond, uncond = (torch.randint(0, 4, (b, t, v), generator=g).float().to(dtype) for _ in range(2))
    else:
        cond, uncond = ((torch.randn(b, t, v, generator=g) * 3).to(dtype) for _ in range(2))
    current = torch.randint(0, v, (b, t), generator=g)
    current[torch.rand(b, t, generator=g) < 0.7] = v
    uniform = torch.rand(b, t, generator=g)
    return cond, uncond, current, uniform


def _check_same_as_ref(cond: torch.Tensor, uncond: torch.Tensor, current: torch.Tensor, mask_id: int,
                       params: StepSampling, uniform: torch.Tensor) -> None:
    noise = uniform if params.any_sampled else None
    tokens, probs = ksamp.sample(cond, uncond, current, mask_id, params, noise)
    ref_tokens, ref_probs = ksamp.sample_ref(cond, uncond, current, mask_id, params, noise)
    assert tokens.dtype == torch.int64 and probs.dtype == torch.float32
    assert torch.equal(tokens, ref_tokens), f"{(tokens != ref_tokens).sum().item()} tokens differ"
    torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=0.0)
    # write-back only where masked; elsewhere the current token stays
    masked = current == mask_id
    assert torch.equal(tokens[~masked], current[~masked])
    assert ((tokens[masked] >= 0) & (tokens[masked] < cond.shape[-1])).all()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("v", [37, 2048])
def test_sample_matches_ref(v: int, mode: str) -> None:
    params = MODES[mode]
    cond, uncond, current, uniform = _step_inputs(2, 50, v, torch.float32, seed=v)
    _check_same_as_ref(cond, uncond, current, v, params, uniform)


@pytest.mark.parametrize("names", [
    list(MODES),  # every mode side by side
    ["greedy", "greedy-cold"],  # all greedy: no noise needed
    ["top_k1", "top_k5", "top_k_all", "multinomial"],  # top-k rows with different k beside multinomial
    ["top_p0.3", "greedy", "top_p1"],
], ids=["all", "greedy", "top_k", "top_p"])
@pytest.mark.parametrize("v", [37, 2048])
def test_sample_per_row_parameters(v: int, names: list[str]) -> None:
    """One call, each row with its own guidance, temperature and mode (the scheduler's batches): the kernel picks
    the reference's tokens, and each row equals that row sampled alone with its own scalar parameters."""
    rows = [MODES[n] for n in names]
    cond, uncond, current, uniform = _step_inputs(len(rows), 30, v, torch.float32, seed=len(rows) + v)
    params = StepSampling.concat([(p, 1) for p in rows])
    noise = uniform if params.any_sampled else None
    _check_same_as_ref(cond, uncond, current, v, params, uniform)
    tokens, probs = ksamp.sample_ref(cond, uncond, current, v, params, noise)
    for i, p in enumerate(rows):
        one = ksamp.sample_ref(cond[i:i + 1], uncond[i:i + 1], current[i:i + 1], v, p,
                               None if p.greedy else uniform[i:i + 1])
        assert torch.equal(tokens[i:i + 1], one[0]) and torch.equal(probs[i:i + 1], one[1]), names[i]


def test_sample_per_row_validation() -> None:
    cond, uncond, current, uniform = _step_inputs(2, 5, 37, torch.float32, seed=0)
    with pytest.raises(ValueError, match="3 per-row values for 2 rows"):
        ksamp.sample(cond, uncond, current, 37, StepSampling((1.0, 2.0, 3.0), 1.0, 0, 0.0, True), None)
    with pytest.raises(ValueError, match="uniform noise"):  # one sampled row needs noise
        ksamp.sample(cond, uncond, current, 37, StepSampling(1.0, 1.0, 0, 0.0, (True, False)), None)
    with pytest.raises(ValueError, match="top_k = 38"):
        ksamp.sample(cond, uncond, current, 37, StepSampling(1.0, 1.0, (38, 2), 0.0, False), uniform)
    with pytest.raises(ValueError, match="temperature"):
        ksamp.sample(cond, uncond, current, 37, StepSampling(1.0, (1.0, 0.0), 0, 0.0, True), None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("mode", ["greedy", "multinomial", "top_k5", "top_p0.9"])
def test_sample_low_precision_logits(mode: str, dtype: torch.dtype) -> None:
    cond, uncond, current, uniform = _step_inputs(3, 40, 2048, dtype, seed=11)
    _check_same_as_ref(cond, uncond, current, 2048, MODES[mode], uniform)


@pytest.mark.parametrize("mode", ["greedy", "multinomial", "top_k5", "top_p0.3"])
def test_sample_ties(mode: str) -> None:
    # tied logits: argmax takes the first, top-k keeps every tie of the k-th value, top-p keeps whole tie groups
    cond, uncond, current, uniform = _step_inputs(4, 64, 37, torch.float32, seed=5, ties=True)
    _check_same_as_ref(cond, uncond, current, 37, MODES[mode], uniform)


def test_sample_strided_logits() -> None:
    # the model emits [B, T, K, V] and the loop samples one codebook: a strided [B, T, V] view
    g = torch.Generator().manual_seed(9)
    full = torch.randn(2, 2, 30, 4, 37, generator=g)  # [cond/uncond, B, T, K, V]
    cond, uncond = full[0, :, :, 1], full[1, :, :, 1]
    assert not cond.is_contiguous()
    current = torch.full((2, 30), 37)
    current[:, ::3] = 4
    uniform = torch.rand(2, 30, generator=g)
    for mode in ("greedy", "top_k5", "top_p0.9"):
        _check_same_as_ref(cond, uncond, current, 37, MODES[mode], uniform)


def _chi_square_p(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson goodness of fit; bins with expected count < 5 pooled into one. p = Q(df/2, chi2/2)."""
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum().reshape(1)]) if small.any() else counts
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)]) if small.any() else expected
    keep = exp > 0
    chi2 = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), chi2 / 2))


@pytest.mark.parametrize("mode", ["multinomial", "top_k5", "top_p0.9"])
def test_sample_distribution(mode: str) -> None:
    params, v, n = MODES[mode], 37, 20_000
    g = torch.Generator().manual_seed(2024)
    row_c, row_u = torch.randn(v, generator=g), torch.randn(v, generator=g)
    cond, uncond = row_c.expand(1, n, v), row_u.expand(1, n, v)  # one row, n positions (stride 0 over T)
    current = torch.full((1, n), v)
    tokens, _ = ksamp.sample(cond, uncond, current, v, params, torch.rand(1, n, generator=g))
    # expected distribution computed independently, in float64 with a sort
    p = torch.softmax((row_u.double() + (row_c.double() - row_u.double()) * params.cfg_coef) / params.temperature, 0)
    if params.top_p > 0:
        sp, order = torch.sort(p, descending=True)
        keep_sorted = (torch.cumsum(sp, 0) - sp) <= params.top_p
        keep = torch.zeros(v, dtype=torch.bool)
        keep[order[keep_sorted]] = True
    elif params.top_k > 0:
        keep = p >= torch.topk(p, params.top_k).values[-1]
    else:
        keep = torch.ones(v, dtype=torch.bool)
    target = torch.where(keep, p, 0.0)
    target = target / target.sum()
    counts = torch.bincount(tokens.flatten(), minlength=v).double()
    assert counts[~keep].sum() == 0, "drew tokens outside the kept set"
    p_value = _chi_square_p(counts[keep], target[keep] * n)
    assert p_value > 1e-3, f"chi-square p = {p_value:.2e}: the kernel's draws do not follow the distribution"


def test_sample_validation() -> None:
    cond, uncond, current, uniform = _step_inputs(2, 5, 37, torch.float32, seed=0)
    multi = MODES["multinomial"]
    with pytest.raises(ValueError, match="uniform noise"):
        ksamp.sample(cond, uncond, current, 37, multi, None)
    with pytest.raises(ValueError, match="uniform must be"):
        ksamp.sample(cond, uncond, current, 37, multi, uniform[:1])
    with pytest.raises(TypeError, match="float32"):
        ksamp.sample(cond, uncond, current, 37, multi, uniform.double())
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        ksamp.sample(cond[0], uncond[0], current, 37, multi, uniform)
    with pytest.raises(ValueError, match="uncond"):
        ksamp.sample(cond, uncond[:, :3], current, 37, multi, uniform)
    with pytest.raises(TypeError, match="int64"):
        ksamp.sample(cond, uncond, current.int(), 37, multi, uniform)
    with pytest.raises(ValueError, match="current must be"):
        ksamp.sample(cond, uncond, current[:, :2], 37, multi, uniform)
    with pytest.raises(TypeError, match="logits"):
        ksamp.sample(cond.double(), uncond.double(), current, 37, multi, uniform)
    with pytest.raises(TypeError, match="StepSampling"):
        ksamp.sample(cond, uncond, current, 37, {"top_k": 5}, uniform)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        ksamp.sample(cond, uncond, current, 37, StepSampling(3.0, 1.0, 38, 0.0, False), uniform)
    with pytest.raises(ValueError, match="temperature"):
        ksamp.sample(cond, uncond, current, 37, StepSampling(3.0, 0.0, 0, 0.0, False), uniform)
    with pytest.raises(TypeError, match="mask_id"):
        ksamp.sample(cond, uncond, current, 37.0, multi, uniform)  # type: ignore[arg-type]
    big = torch.zeros(1, 1, ksamp.MAX_VOCAB + 1)
    with pytest.raises(ValueError, match="sample_ref"):
        ksamp.sample(big, big, torch.zeros(1, 1, dtype=torch.long), 0, GREEDY, None)
    # greedy needs no noise; an empty step is fine
    ksamp.sample(cond, uncond, current, 37, GREEDY, None)
    tokens, probs = ksamp.sample(cond[:, :0], uncond[:, :0], current[:, :0], 37, multi, uniform[:, :0])
    assert tokens.shape == probs.shape == (2, 0)
