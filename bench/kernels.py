"""Micro-benchmarks of the Triton kernels against PyTorch on a CUDA GPU.

    python -m magnet_engine.bench.kernels [--json rows.jsonl] [--T 500 1500] [--B 1 4 16] [--dtypes fp16 bf16] ...

attention: `kernels.attention.attention` vs `F.scaled_dot_product_attention` (full and cross: its flash path;
band: with a boolean [T, T] band mask, which is what a model without a band kernel does), for magnet-small (H=16)
and magnet-medium (H=24), D=64, N = 2B rows (classifier-free guidance doubles the batch). TFLOP/s counts the work
actually needed (the in-band q·k pairs for the band); the dense-equivalent rate (T² pairs) is reported beside it.

sampling: `kernels.sampling.sample` vs the eager chain `engine.sampling.sample_ref` on [B, T, V] cond/uncond
logits; GB/s = logit bytes read (cond + uncond) / time.

invariant_matmul: what deterministic mode costs in the LM's GEMMs. The row-invariant Triton GEMM
(`kernels.matmul.invariant_matmul`, the Triton backend's deterministic linear on CUDA) against F.linear (the default
mode: cuBLAS) and against `engine.model.invariant_linear` (the torch path's deterministic linear: one GEMM per 64
rows), for every linear of a MAGNeT pass at the model's shapes: rows M = 2·B·T (guidance doubles the batch; the
cross-attention's q and out projections see the B·T conditional rows), the head in fp32 as the LM keeps it. One row
per linear and baseline, then `linear-pass`: layers × (its linears) + one head, i.e. the GEMM time of one LM pass.
`--device cpu` runs it through Triton's interpreter (a dry run of the stage: its times are not the kernel's).

Times are medians over repeats timed with CUDA events, each repeat long enough (>= ~1 ms of launches) to hide event
resolution. Prints a Markdown table; `--json FILE` appends one JSON object per row. Without a GPU it exits with 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch
from magnet_engine.engine.config import ModelConfig

MODELS = {"magnet-small": 16, "magnet-medium": 24}  # name -> heads (D = 64 for both)
# name -> bench.presets preset, whose ModelConfig gives the linears' shapes (tiny: the CPU dry run's)
LINEAR_MODELS = {"magnet-small": "magnet-small-10secs", "magnet-medium": "magnet-medium-10secs", "tiny": "tiny"}
HEAD_DIM = 64
DEVICE = "cuda"  # the benchmarks time CUDA events; a module constant so a CPU smoke test can swap it
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Row:
    """One benchmark result; also the JSON line written with --json."""

    op: str  # attention-full | attention-band | attention-cross | sample-top_p | ... | linear-qkv | linear-pass
    model: str
    dtype: str
    batch: int  # B prompts
    rows: int  # N = 2B for attention, B for sampling, the GEMM's M for linears
    heads: int
    T: int
    Tk: int  # keys (L for cross-attention, V for sampling, out features N for linears)
    window: int | None
    kernel_ms: float
    torch_ms: float
    baseline: str
    speedup: float
    flops: float  # useful FLOPs (attention) or 0
    dense_flops: float  # dense-equivalent FLOPs (attention) or 0
    tflops: float
    tflops_dense_equiv: float
    bytes_read: float  # logits bytes (sampling) or q/k/v bytes (attention)
    gbps: float
    check: float  # attention, linears: max |kernel - torch|; sampling: fraction of tokens equal to sample_ref's
    device: str
    torch_version: str
    triton_version: str


def band_pairs(t: int, w: int) -> int:
    """Number of (q, k) pairs with |q - k| <= w in a length-t sequence: t·(2w+1) minus the clipped corners."""
    w = min(w, t - 1)
    return t * (2 * w + 1) - w * (w + 1)


def attention_flops(n: int, h: int, tq: int, tk: int, d: int, pairs: int | None = None) -> float:
    """q·kᵀ and p·v: 2 multiply-adds per (pair, d) each = 4·pairs·D per (row, head). Softmax not counted."""
    return 4.0 * n * h * d * (tq * tk if pairs is None else pairs)


def time_cuda(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median milliseconds per call over `repeats`, each repeat a burst of calls timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    inner = max(1, min(1000, math.ceil(1.0 / max(start.elapsed_time(end), 1e-3))))  # ~1 ms per repeat
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def time_cpu(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median milliseconds per call on the host clock (`--device cpu`: the interpreter's dry run)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def pass_linears(cfg: ModelConfig, batch: int, frames: int) -> list[tuple[str, int, int, int, int]]:
    """The linears of one MAGNeT pass: (name, rows M, out N, in K, times per pass). Guided: 2B·T rows, of which the
    B·T conditional ones go through cross-attention; the head (one codebook per pass) once, the rest per layer."""
    rows, d, layers = 2 * batch * frames, cfg.dim, cfg.num_layers
    return [("qkv", rows, 3 * d, d, layers), ("out", rows, d, d, layers), ("cross-q", rows // 2, d, d, layers),
            ("cross-out", rows // 2, d, d, layers), ("ffn-up", rows, cfg.ffn_dim, d, layers),
            ("ffn-down", rows, d, cfg.ffn_dim, layers), ("head", rows, cfg.card, d, 1)]


def bench_invariant_matmul(args: argparse.Namespace, env: dict[str, str]) -> list[Row]:
    import torch.nn.functional as F
    from magnet_engine.bench.presets import PRESETS
    from magnet_engine.engine.model import invariant_linear
    from magnet_engine.kernels.matmul import invariant_matmul

    timer = time_cuda if args.device == "cuda" else time_cpu
    rows: list[Row] = []
    dev = torch.device(args.device)
    for model, preset in LINEAR_MODELS.items():
        if model not in args.models:
            continue
        cfg = PRESETS[preset].model_config("magnet")
        for dname in args.dtypes:
            for t in args.T:
                for b in args.B:
                    totals = {"F.linear": [0.0, 0.0, 0.0], "invariant_linear": [0.0, 0.0, 0.0]}  # kernel, torch, FLOPs
                    for name, m, n, k, times in pass_linears(cfg, b, t):
                        dn = "fp32" if name == "head" else dname  # the LM's heads stay fp32
                        dt = DTYPES[dn]
                        x = torch.randn(m, k, device=dev, dtype=dt)
                        w = torch.randn(n, k, device=dev, dtype=dt) / math.sqrt(k)
                        out = invariant_matmul(x, w)
                        k_ms = timer(partial(invariant_matmul, x, w), args.repeats, args.warmup)
                        flops = 2.0 * m * n * k
                        nbytes = float((x.numel() + w.numel() + out.numel()) * x.element_size())
                        for base_name, base in (("F.linear", F.linear), ("invariant_linear", invariant_linear)):
                            err = (out.float() - base(x, w).float()).abs().max().item()
                            t_ms = timer(partial(base, x, w), args.repeats, args.warmup)
                            rows.append(Row(f"linear-{name}", model, dn, b, m, 0, t, n,
                                            None, k_ms, t_ms, base_name, t_ms / k_ms, flops, flops, flops / k_ms / 1e9,
                                            flops / k_ms / 1e9, nbytes, nbytes / k_ms / 1e6, err, **env))
                            for i, v in enumerate((k_ms, t_ms, flops)):
                                totals[base_name][i] += times * v
                    for base_name, (k_ms, t_ms, flops) in totals.items():
                        rows.append(Row("linear-pass", model, dname, b, 2 * b * t, 0, t, 0, None, k_ms, t_ms,
                                        base_name, t_ms / k_ms, flops, flops, flops / k_ms / 1e9, flops / k_ms / 1e9,
                                        0.0, 0.0, 0.0, **env))
    return rows


def bench_attention(args: argparse.Namespace, env: dict[str, str]) -> list[Row]:
    import torch.nn.functional as F
    from magnet_engine.engine.ops import band_mask
    from magnet_engine.kernels.attention import attention

    rows: list[Row] = []
    dev = torch.device(DEVICE)
    for model, h in MODELS.items():
        if model not in args.models:
            continue
        for dname in args.dtypes:
            dt = DTYPES[dname]
            for t in args.T:
                mask = band_mask(t, args.window, dev)  # [T, T] bool, True = attend
                for b in args.B:
                    n = 2 * b
                    q, k, v = (torch.randn(n, h, t, HEAD_DIM, device=dev, dtype=dt) for _ in range(3))
                    qc, kc, vc = (torch.randn(n, h, args.L, HEAD_DIM, device=dev, dtype=dt) for _ in range(3))
                    sdpa = F.scaled_dot_product_attention
                    cases = [  # (op, window, (q, k, v), baseline, its name, keys, useful FLOPs)
                        ("attention-full", None, (q, k, v), partial(sdpa, q, k, v), "sdpa", t,
                         attention_flops(n, h, t, t, HEAD_DIM)),
                        ("attention-band", args.window, (q, k, v), partial(sdpa, q, k, v, attn_mask=mask),
                         "sdpa+bool-mask", t, attention_flops(n, h, t, t, HEAD_DIM, band_pairs(t, args.window))),
                        ("attention-cross", None, (q, kc, vc), partial(sdpa, q, kc, vc), "sdpa", args.L,
                         attention_flops(n, h, t, args.L, HEAD_DIM)),
                    ]
                    for op, window, (qq, kk, vv), base, base_name, tk, flops in cases:
                        dense = attention_flops(n, h, t, tk, HEAD_DIM)
                        out = attention(qq, kk, vv, window)
                        err = (out.float() - base().float()).abs().max().item()
                        k_ms = time_cuda(partial(attention, qq, kk, vv, window), args.repeats, args.warmup)
                        t_ms = time_cuda(base, args.repeats, args.warmup)
                        nbytes = float((qq.numel() + kk.numel() + vv.numel() + qq.numel()) * qq.element_size())
                        rows.append(Row(op, model, dname, b, n, h, t, tk, window, k_ms, t_ms, base_name, t_ms / k_ms,
                                        flops, dense, flops / k_ms / 1e9, dense / k_ms / 1e9, nbytes,
                                        nbytes / k_ms / 1e6, err, **env))
    return rows


def bench_sampling(args: argparse.Namespace, env: dict[str, str]) -> list[Row]:
    from magnet_engine.engine.sampling import StepSampling, sample_ref
    from magnet_engine.kernels.sampling import sample

    v = args.V
    modes = {  # audiocraft MAGNeT samples with top_p 0.9 by default; MusicGen with top_k 250
        "top_p": StepSampling(cfg_coef=3.0, temperature=3.0, top_k=0, top_p=0.9, greedy=False),
        "top_k": StepSampling(cfg_coef=3.0, temperature=1.0, top_k=min(250, v), top_p=0.0, greedy=False),
        "multinomial": StepSampling(cfg_coef=3.0, temperature=1.0, top_k=0, top_p=0.0, greedy=False),
        "greedy": StepSampling(cfg_coef=3.0, temperature=1.0, top_k=0, top_p=0.0, greedy=True),
    }
    rows: list[Row] = []
    dev = torch.device(DEVICE)
    for dname in args.dtypes:
        dt = DTYPES[dname]
        for t in args.T:
            for b in args.B:
                cond = torch.randn(b, t, v, device=dev, dtype=dt) * 3
                uncond = torch.randn(b, t, v, device=dev, dtype=dt) * 3
                current = torch.full((b, t), v, device=dev, dtype=torch.long)
                uniform = torch.rand(b, t, device=dev)
                for name, params in modes.items():
                    if name not in args.modes:
                        continue
                    noise = None if params.greedy else uniform
                    tok, _ = sample(cond, uncond, current, v, params, noise)
                    ref, _ = sample_ref(cond, uncond, current, v, params, noise)
                    same = (tok == ref).float().mean().item()
                    step = (cond, uncond, current, v, params, noise)
                    k_ms = time_cuda(partial(sample, *step), args.repeats, args.warmup)
                    t_ms = time_cuda(partial(sample_ref, *step), args.repeats, args.warmup)
                    nbytes = float(2 * cond.numel() * cond.element_size())
                    rows.append(Row(f"sample-{name}", "-", dname, b, b, 0, t, v, None, k_ms, t_ms, "sample_ref",
                                    t_ms / k_ms, 0.0, 0.0, 0.0, 0.0, nbytes, nbytes / k_ms / 1e6, same, **env))
    return rows


def markdown(rows: list[Row]) -> str:
    head = ("| op | model | dtype | B | T | Tk/V | W | kernel ms | torch ms | baseline | speedup | TFLOP/s | "
            "dense-eq TFLOP/s | GB/s | check |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r.op} | {r.model} | {r.dtype} | {r.batch} | {r.T} | {r.Tk} | {'' if r.window is None else r.window} "
            f"| {r.kernel_ms:.4f} | {r.torch_ms:.4f} | {r.baseline} | {r.speedup:.2f}x | "
            f"{r.tflops:.1f} | {r.tflops_dense_equiv:.1f} | {r.gbps:.0f} | {r.check:.3g} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m magnet_engine.bench.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--what", nargs="+", choices=("attention", "sampling", "invariant_matmul"),
                   default=["attention", "sampling"])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a dry run through Triton's interpreter (invariant_matmul only; tiny shapes with --quick)")
    p.add_argument("--models", nargs="+", choices=tuple(LINEAR_MODELS), default=list(MODELS),
                   help="tiny: invariant_matmul only (the CPU dry run's shapes)")
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=["fp16", "bf16"])
    p.add_argument("--T", nargs="+", type=int, default=[500, 1500], help="frames (500 = 10 s, 1500 = 30 s)")
    p.add_argument("--B", nargs="+", type=int, default=[1, 4, 16], help="prompts; attention rows are N = 2B")
    p.add_argument("--window", type=int, default=5, help="band half-width W for stages >= 1")
    p.add_argument("--L", type=int, default=20, help="text length for cross-attention")
    p.add_argument("--V", type=int, default=2048, help="vocabulary per codebook")
    p.add_argument("--modes", nargs="+", default=["top_p", "top_k", "greedy"],
                   choices=("top_p", "top_k", "multinomial", "greedy"))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", metavar="FILE", help="append one JSON object per result row")
    p.add_argument("--quick", action="store_true", help="smoke run: magnet-small, T=500, B=1, fp16, 5 repeats "
                   "(--device cpu: the tiny model, T=4, 1 repeat)")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.T, args.B, args.dtypes = ["magnet-small"], [500], [1], ["fp16"]
        args.repeats, args.warmup = 5, 1
        if args.device == "cpu":
            args.models, args.T, args.repeats, args.warmup = ["tiny"], [4], 1, 0
    if args.device == "cpu" and set(args.what) != {"invariant_matmul"}:
        p.error("--device cpu runs --what invariant_matmul only (the attention and sampling benchmarks need CUDA)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; 0 on success, 2 when there is no CUDA GPU or no triton."""
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench kernels: error: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured "
              "(--device cpu --what invariant_matmul is a dry run)", file=sys.stderr)
        return 2
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import, which decides it
    try:
        import triton
    except ImportError:
        print("bench kernels: error: needs triton: pip install 'magnet-engine[triton]'", file=sys.stderr)
        return 2
    if args.device == "cpu":
        from magnet_engine.kernels.matmul import INTERPRETED

        if not INTERPRETED:
            print("bench kernels: error: --device cpu needs Triton's interpreter, but triton was imported without "
                  "TRITON_INTERPRET=1; set it in the environment", file=sys.stderr)
            return 2
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({platform.processor() or 'unknown'})"
    env = {"device": name, "torch_version": torch.__version__, "triton_version": triton.__version__}
    torch.manual_seed(0)
    rows: list[Row] = []
    if "attention" in args.what:
        rows += bench_attention(args, env)
    if "sampling" in args.what:
        rows += bench_sampling(args, env)
    if "invariant_matmul" in args.what:
        rows += bench_invariant_matmul(args, env)
    print(f"device: {env['device']}, torch {env['torch_version']}, triton {env['triton_version']}\n")
    print(markdown(rows))
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({"bench": "kernels", **asdict(r)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
