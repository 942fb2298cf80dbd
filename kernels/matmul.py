"""A row-invariant GEMM in Triton, a drop-in for `engine.model.invariant_linear` (F.linear without bias).

    x [M, K] @ weight[N, K]^T -> [M, N]: each program owns one BLOCK_M x BLOCK_N tile of the output and walks K from
    0 in BLOCK_K steps into one fp32 accumulator, then rounds once to x's dtype.

Row invariance by construction: the tile sizes are constants per dtype (no autotuning over them, no choice by M),
the reduction is never split (no split-K, no atomics, no stream-K), and the rows of a tile do not mix, so every
output element is reduced over the same K tiles, in the same order, by the same instructions whatever M is and
wherever its row sits in x. A row's bits therefore never depend on its batchmates. The engine's torch version of the
same property (`invariant_linear`) gets it by calling the library on fixed blocks of 64 rows: ⌈M/64⌉ GEMM launches
per linear (250 at B=16 on magnet-small), each filling a small part of a GPU; this is one launch.

The same idea as Thinking Machines' `batch_invariant_ops` and vLLM's batch-invariant mode (a fixed-config Triton
matmul with fp32 accumulation swapped in for aten::mm); here it is swapped into the LM from outside instead
(`LM.set_invariant_linear`, by `kernels.backend.apply`), so the default, non-deterministic mode keeps cuBLAS.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from magnet_engine.engine.model import invariant_linear as invariant_matmul_ref
from triton.runtime.jit import JITFunction

from .attention import _rtne_bf16

__all__ = ["BLOCKS", "INTERPRETED", "invariant_matmul", "invariant_matmul_ref"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# dtype -> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): one tiling per dtype, never chosen by shape (that
# choice is what makes a library GEMM's rows depend on M). Half precision: the tiles the batch-invariant matmuls of
# batch_invariant_ops and vLLM use for bf16 on H100 (tensor cores, ~96 KB of shared memory in 3 stages); fp32 runs
# IEEE FMAs (no TF32, like torch's default) with a shorter K step to keep shared memory at ~96 KB.
BLOCKS: dict[torch.dtype, tuple[int, int, int, int, int]] = {
    torch.float16: (128, 128, 64, 8, 3),
    torch.bfloat16: (128, 128, 64, 8, 3),
    torch.float32: (128, 128, 32, 8, 3),
}
_GROUP_M = 8  # tiles visited in groups of 8 row blocks, so weight tiles are reused from L2; no effect on the numbers


@triton.jit(do_not_specialize=["M"])  # one binary for every M: M == 1 or M % 16 == 0 must not pick another kernel
def _matmul(
    X, W, Out,  # [M, K], [N, K], [M, N]; any strides
    M, N, K,
    sxm, sxk,  # strides of x (elements)
    swn, swk,
    som, son,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K (a property of the weight, never of M)
    ROW_DOT: tl.constexpr,  # the interpreter: each element's products summed over K in fp32 (see below)
    IEEE: tl.constexpr,  # fp32 inputs: no TF32 on the GPU
    RTNE_BF16: tl.constexpr,  # bf16 under the interpreter: round the output like the GPU does
):
    # grouped order of the tiles (row blocks of GROUP_M share a column of weight tiles): a schedule, not arithmetic
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_m
    pid_n = (pid % width) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] rows of x / out
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] rows of weight = columns of out
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    # Rows/columns past the edge read row/column 0 instead of being masked (their results are never stored): the
    # loads of a tile are the same instructions whether it is full or not.
    rows = tl.where(offs_m < M, offs_m, 0).to(tl.int64)  # int64: M*K passes 2**31 for long batches
    cols = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    x_ptrs = X + rows[:, None] * sxm + offs_k[None, :] * sxk  # [BLOCK_M, BLOCK_K]
    w_ptrs = W + offs_k[:, None] * swk + cols[None, :] * swn  # [BLOCK_K, BLOCK_N]: weight^T

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):  # K in order from 0, whole: the one reduction order of every element
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_ok = offs_k < K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if ROW_DOT:
            # The interpreter's tl.dot is numpy's matmul, and OpenBLAS's sgemm rounds a row by its place in the
            # block (a row at row 0 or row 37 of the same tile differs in the last bit); the GPU's MMA does the
            # same for every element. Products summed over K element by element are place-independent too, and
            # exact for fp16/bf16 inputs (bf16 also needs the fp32 copy: the interpreter multiplies its raw bits).
            prod = a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :]  # [BLOCK_M, BLOCK_K, BLOCK_N]
            acc += tl.sum(prod, axis=1)
        elif IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk

    if RTNE_BF16:
        out = _rtne_bf16(acc)
    else:
        out = acc.to(Out.dtype.element_ty)
    o_ptrs = Out + offs_m.to(tl.int64)[:, None] * som + offs_n[None, :] * son
    tl.store(o_ptrs, out, mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


# decided by triton when this module was imported (TRITON_INTERPRET=1: numpy interpreter, any device)
INTERPRETED = not isinstance(_matmul, JITFunction)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    """Raise TypeError/ValueError saying what to change; the kernel itself trusts its inputs."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"invariant_matmul: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"invariant_matmul: {name} has dtype {t.dtype}; cast to float32, float16 or bfloat16")
    if x.dtype != weight.dtype:
        raise TypeError(f"invariant_matmul: x is {x.dtype} but weight is {weight.dtype}; cast x to the weight's dtype "
                        "(F.linear needs one dtype too)")
    if weight.dim() != 2:
        raise ValueError(f"invariant_matmul: weight must be 2-D [N, K] (an nn.Linear's), got shape "
                         f"{tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"invariant_matmul: x [.., K] must end in the weight's K = {weight.shape[1]}, got shape "
                         f"{tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"invariant_matmul: x is on {x.device} but weight on {weight.device}; move them to one device")
    if x.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"invariant_matmul: Triton kernels need CUDA tensors, got {x.device}; use "
                         "engine.model.invariant_linear on CPU or set TRITON_INTERPRET=1 before importing triton "
                         "(slow, for tests)")


def invariant_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) without bias whose every row comes out the same bits whatever other rows share the call.

    x [.., K], weight [N, K] (fp32, fp16 or bf16, one dtype, any strides) -> [.., N] in x's dtype, accumulated in
    fp32 (fp32 inputs: IEEE, no TF32). Same contract as `engine.model.invariant_linear` (= `invariant_matmul_ref`);
    inference only (no autograd).
    """
    _check(x, weight)
    lead, k_dim = x.shape[:-1], x.shape[-1]
    n_dim = weight.shape[0]
    x2 = x.reshape(-1, k_dim)  # a view for the engine's activations; strides are passed, so no copy is forced
    m_dim = x2.shape[0]
    out = torch.empty((m_dim, n_dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out.reshape(*lead, n_dim)
    block_m, block_n, block_k, warps, stages = BLOCKS[x.dtype]
    grid = (triton.cdiv(m_dim, block_m) * triton.cdiv(n_dim, block_n),)
    _matmul[grid](
        x2, weight, out,
        m_dim, n_dim, k_dim,
        x2.stride(0), x2.stride(1),
        weight.stride(0), weight.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=_GROUP_M, EVEN_K=k_dim % block_k == 0,
        ROW_DOT=INTERPRETED, IEEE=x.dtype == torch.float32,
        RTNE_BF16=INTERPRETED and x.dtype == torch.bfloat16,
        num_warps=warps, num_stages=stages,
        enable_fp_fusion=True,  # the dot is FMAs whatever this says; explicit = no triton 3.9 warning
    )
    return out.reshape(*lead, n_dim)
