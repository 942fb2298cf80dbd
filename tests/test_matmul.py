"""The row-invariant Triton GEMM (`kernels.matmul.invariant_matmul`) through Triton's interpreter on CPU tensors.

Accuracy, per call: max|kernel - ref64| <= 2 * max|F.linear_same_dtype - ref64| + one ulp of max|ref64| in the
dtype, where ref64 is F.linear in fp64 on the same (already rounded) inputs: the kernel may be as inexact as
PyTorch's own same-dtype linear, twice over, plus the rounding of its one final cast.

Row invariance: a row's output is the same bits alone (M = 1), in batches of other sizes and at any offset in them
(inside a tile, across a tile edge), which is what deterministic decoding needs from every linear.
"""
from __future__ import annotations

import os

# Must precede the first `import triton` anywhere in the process (conftest sets it too).
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed: pip install 'triton>=3.2' (extra [triton])")

import magnet_engine.kernels.matmul as kmm  # noqa: E402
from magnet_engine.engine.model import invariant_linear  # noqa: E402

if not kmm.INTERPRETED:
    raise RuntimeError("triton was imported before tests/test_matmul.py set TRITON_INTERPRET=1; add "
                       "os.environ.setdefault('TRITON_INTERPRET', '1') at the top of tests/conftest.py")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ids = str


def _data(m: int, k: int, n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype), (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)


def _check_accuracy(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    out = kmm.invariant_matmul(x, w)
    assert out.shape == (*x.shape[:-1], w.shape[0]) and out.dtype == x.dtype
    ref = F.linear(x.double(), w.double())
    err = (out.double() - ref).abs().max().item()
    torch_err = (F.linear(x, w).double() - ref).abs().max().item()
    bound = 2.0 * torch_err + torch.finfo(x.dtype).eps * ref.abs().max().item()
    assert err <= bound, f"max error {err:.3g} > {bound:.3g} (torch {x.dtype} error {torch_err:.3g})"
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("m", [1, 7, 33, 130])
def test_matches_torch_odd_shapes(m: int, dtype: torch.dtype) -> None:
    """M across one and two row tiles; K and N not multiples of any block (masked K tail, partial column tile),
    and K a multiple of BLOCK_K (the unmasked path)."""
    for k, n in ((100, 70), (64, 130)):
        _check_accuracy(*_data(m, k, n, dtype, seed=m + k))


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_leading_dims_and_strides(dtype: torch.dtype) -> None:
    """x [.., K] like F.linear, a transposed (non-contiguous) x and weight, a row slice of a packed weight (the
    cross-attention's q projection), and empty batches."""
    x, w = _data(24, 48, 90, dtype, seed=1)
    out = _check_accuracy(x.view(2, 3, 4, 48), w)
    assert torch.equal(out.view(24, 90), kmm.invariant_matmul(x, w))
    xt = x.t().contiguous().t()  # same values, column-major
    wt = w.t().contiguous().t()
    assert xt.stride() != x.stride() and wt.stride() != w.stride()
    assert torch.equal(kmm.invariant_matmul(xt, wt), kmm.invariant_matmul(x, w))
    _check_accuracy(x, w[10:50])
    assert kmm.invariant_matmul(x[:0], w).shape == (0, 90)
    assert kmm.invariant_matmul(x.view(2, 12, 48)[:, :0], w).shape == (2, 0, 90)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_rows_are_batch_invariant(dtype: torch.dtype) -> None:
    """Rows computed alone (M = 1), as a batch of m, and inside larger batches at several offsets (the first rows,
    mid-tile, straddling the 128-row tile edge) are bit-equal."""
    block_m = kmm.BLOCKS[dtype][0]
    x, w = _data(33, 100, 70, dtype, seed=7)
    g = torch.Generator().manual_seed(8)
    alone = torch.cat([kmm.invariant_matmul(x[i:i + 1], w) for i in range(x.shape[0])])
    for m in (1, 7, 33):
        assert torch.equal(kmm.invariant_matmul(x[:m], w), alone[:m]), m
        for before in (1, 5, block_m - 3):
            for after in (0, 130):
                pack = torch.cat([torch.randn(before, 100, generator=g).to(dtype), x[:m],
                                  torch.randn(after, 100, generator=g).to(dtype)])
                got = kmm.invariant_matmul(pack, w)[before:before + m]
                assert torch.equal(got, alone[:m]), (m, before, after)


def test_reference_is_the_engines_invariant_linear() -> None:
    """`invariant_matmul_ref` is the op the kernel replaces in deterministic mode."""
    assert kmm.invariant_matmul_ref is invariant_linear


@pytest.mark.parametrize("args, error, message", [
    ((torch.zeros(2, 4), torch.zeros(3, 5)), ValueError, "must end in the weight's K = 5"),
    ((torch.zeros(2, 4), torch.zeros(3, 4, 1)), ValueError, "weight must be 2-D"),
    ((torch.zeros(2, 4), torch.zeros(3, 4, dtype=torch.float16)), TypeError, "cast x to the weight's dtype"),
    ((torch.zeros(2, 4, dtype=torch.int32), torch.zeros(3, 4, dtype=torch.int32)), TypeError, "cast to float32"),
    (([[1.0]], torch.zeros(3, 4)), TypeError, "x must be a torch.Tensor"),
    ((torch.zeros(2, 4), torch.zeros(3, 4, device="meta")), ValueError, "move them to one device"),
])
def test_bad_inputs_say_what_to_do(args: tuple, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        kmm.invariant_matmul(*args)


def test_cpu_without_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kmm, "INTERPRETED", False)
    with pytest.raises(ValueError, match="use engine.model.invariant_linear on CPU"):
        kmm.invariant_matmul(torch.zeros(2, 4), torch.zeros(3, 4))
