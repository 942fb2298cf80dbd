"""Half precision against fp32 on one model: how far the logits and the greedy tokens move.

The rule (engine.model `LM.to_dtype`, `Layer.forward`): under float16/bfloat16 the matmuls and attention run in half
precision and the residual stream, the norms, the heads and the sampler in fp32, as the reference's autocast does.
The variant `half-residual` is the engine before that rule (residual stream and norms in half precision), built in the
same process from the same weights, so one run compares the two.

    python -m magnet_engine.bench precision --model magnet-small-10secs --dtype bfloat16 --duration 1

Random trained-like weights at a preset's shape (bench.presets), random text conditioning; greedy decoding from the
same start. One JSON line per variant: logits error of one stage-0 pass against fp32 (max |Δ| / max |fp32|, mean
|Δ|), the share of greedy tokens equal to fp32's (all, and per codebook), and seconds.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from magnet_engine.engine import magnet
from magnet_engine.engine.api import DTYPES, TorchStep
from magnet_engine.engine.cli import SPELLING
from magnet_engine.engine.config import GenerationConfig, default_generation
from magnet_engine.engine.model import LM
from magnet_engine.engine.sampling import sample_ref

from .common import cpu_model, versions
from .presets import get_preset, random_lm
from .schema import emit


def half_residual(lm: LM, dtype: torch.dtype) -> LM:
    """The engine before the mixed-precision rule: norms in `dtype` and the embedded rows cast to it, so the residual
    stream runs in half precision."""
    old = copy.deepcopy(lm).to_dtype(dtype)
    old.layers.to(dtype)
    embed = old.embed
    old.embed = lambda codes, offset=0: embed(codes, offset).to(dtype)  # type: ignore[method-assign]
    return old


@torch.no_grad()
def measure(lm: LM, cond: torch.Tensor, gen: GenerationConfig, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (stage-0 logits [2B, T, V] of an all-masked start, greedy codes [B, K, T])."""
    step = TorchStep(lm)(cond)
    dec = magnet.Decoding(lm.cfg, gen, batch, cond.device, step=step)
    logits = lm(magnet.step_rows(dec.prepare(), dec.guided), 0, step.cross)
    dec = magnet.Decoding(lm.cfg, gen, batch, cond.device, step=step)
    magnet.run_together(magnet.each_alone, sample_ref, [dec])
    return logits, dec.codes


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m magnet_engine.bench precision", description=__doc__.split("\n\n")[0])
    ap.add_argument(*SPELLING["model"], default="magnet-small-10secs", help="a MAGNeT preset of bench.presets")
    ap.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    ap.add_argument("--duration", type=float, default=1.0)
    ap.add_argument("--steps", default="3,1,1,1", help="decoding steps per codebook")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--text-len", type=int, default=12)
    ap.add_argument(*SPELLING["seed"], type=int, default=0)
    ap.add_argument(*SPELLING["output"], dest="out", default=None, help="append the JSON lines here too")
    args = ap.parse_args(argv)
    preset = get_preset(args.model)
    if preset.kind != "magnet":
        print(f"bench precision: error: {args.model} is not a MAGNeT preset", file=sys.stderr)
        return 2
    cfg = preset.model_config("magnet")
    torch.manual_seed(args.seed)
    fp32 = random_lm(cfg, torch.device("cpu"), torch.float32, seed=args.seed)
    cond = torch.randn(args.batch, args.text_len, cfg.dim) * 0.5  # [B, L, dim]
    gen = GenerationConfig.from_dict(dict(duration=args.duration, greedy=True,
                                          steps=[int(s) for s in args.steps.split(",")]), default_generation(cfg))
    dtype = DTYPES[args.dtype]
    variants = {"fp32": fp32, "mixed (fp32 residual)": copy.deepcopy(fp32).to_dtype(dtype),
                "half-residual (before)": half_residual(fp32, dtype)}
    ref_logits = ref_codes = None
    for name, lm in variants.items():
        start = time.perf_counter()
        logits, codes = measure(lm, cond, gen, args.batch)
        seconds = time.perf_counter() - start
        if ref_logits is None:
            ref_logits, ref_codes = logits, codes
        delta = (logits - ref_logits).abs()
        same = codes == ref_codes  # [B, K, T]
        row: dict[str, Any] = {
            "bench": "precision", "model": args.model, "variant": name, "dtype": "float32" if name == "fp32" else
            args.dtype, "duration_s": args.duration, "steps": gen.steps, "batch": args.batch,
            "logits_max_rel": round(float(delta.max() / ref_logits.abs().max()), 6),
            "logits_mean_abs": round(float(delta.mean()), 6),
            "tokens_equal": round(float(same.float().mean()), 4),
            "tokens_equal_per_codebook": [round(float(x), 4) for x in same.float().mean(dim=(0, 2))],
            "seconds": round(seconds, 2), "cpu": cpu_model(), "versions": versions()}
        emit([row], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
