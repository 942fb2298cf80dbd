"""Triton kernels for the GPU path: `kernels.attention.attention` (drop-in for `engine.ops.attention`),
`kernels.sampling.sample` (drop-in for `engine.sampling.sample_ref`) and `kernels.matmul.invariant_matmul` (drop-in
for `engine.model.invariant_linear`, deterministic mode's linear), swapped into a built engine by `apply`.

Kept light on purpose: nothing here imports triton at import time, so `import kernels` works without it. The
functions are not re-exported under the package: `kernels.attention` is the submodule, and a same-named function
would be shadowed by it as soon as the submodule is imported.
"""
from __future__ import annotations

from typing import Any


def fastest_attention(q: Any, k: Any, v: Any, window: int | None) -> Any:
    """`engine.ops.attention` by the fastest op for each use, as measured on an H200 (`bench kernels`, fp16): the
    band (stages >= 1) by our Triton kernel (9.3x SDPA with a boolean band mask at B=16, T=1500; equal at B=1,
    T=500); full and cross attention on CUDA by SDPA's flash path (our kernel ran at 0.35-0.9x of it). Off CUDA
    (the interpreter, in tests) every use runs the kernel."""
    from .attention import attention

    if window is None and q.is_cuda:
        import torch.nn.functional as F

        return F.scaled_dot_product_attention(q, k, v)
    return attention(q, k, v, window)


def fastest_invariant_linear(x: Any, weight: Any) -> Any:
    """The deterministic mode's row-invariant linear (`LM.invariant_linear`): on CUDA our fixed-tile Triton GEMM
    (`kernels.matmul.invariant_matmul`: one launch, where `engine.model.invariant_linear` launches one cuBLAS GEMM
    per 64 rows, 250 per linear at B=16 on magnet-small). Under the interpreter (tests) CPU tensors run the kernel
    too; otherwise CPU keeps `invariant_rows` (MKL: a long row's GEMM of its own shape, blocks of 64 rows for the
    rest: what measures best there)."""
    from .matmul import INTERPRETED, invariant_matmul

    if x.is_cuda or INTERPRETED:
        return invariant_matmul(x, weight)
    from magnet_engine.engine.model import invariant_rows

    return invariant_rows(x, weight)


def apply(engine: Any) -> Any:
    """Turn an engine's torch path into the Triton path, in place (gpt-fast style: a transform on a built model).

    Swaps the attention op of every self/cross-attention module of the LM (MAGNeT's full and banded passes; the AR
    model's KV-cached causal path keeps PyTorch) for `fastest_attention`, the per-step sampler, and the row-invariant
    linear of deterministic mode (`Engine.set_deterministic`, before or after this) for `fastest_invariant_linear`.
    Returns the engine. On CPU tensors the kernels need `TRITON_INTERPRET=1` (slow; for tests).
    """
    from magnet_engine.engine.config import SettingError
    from magnet_engine.engine.model import set_attention

    from .sampling import sample

    if engine.lm is None:
        raise SettingError("the triton <backend> needs an engine with a torch LM, not an onnxruntime engine")
    set_attention(engine.lm, fastest_attention, fastest_attention)
    engine.lm.set_invariant_linear(fastest_invariant_linear)
    engine.sample = sample
    engine.backend = "triton"
    return engine


class TritonBackend:
    """`magnet_engine.load(model, backend="triton")`: the torch backend's engine with the Triton attention and sampler
    swapped in (`apply`). Registered under the entry-point group magnet_engine.backends."""

    name = "triton"

    def handles(self, source: Any) -> bool:
        return False  # reads what torch reads

    def load(self, source: Any, *, device: Any, dtype: Any, text_encoder: Any) -> Any:
        from magnet_engine.engine.backends import TorchBackend

        return self.adapt(TorchBackend().load(source, device=device, dtype=dtype, text_encoder=text_encoder))

    def adapt(self, engine: Any) -> Any:
        import triton  # noqa: F401 - a missing triton fails here, with the backend's name, not mid-generation

        return apply(engine)
