"""int8 vs fp32 ONNX exports of one model, CPU:
`python -m magnet_engine.bench quant --fp32 DIR --int8 DIR [--threads 1,2]`.

Both folders come from `magnet export` (the int8 one with `--quantize int8`; exports of the same model). Measured,
per thread count, in one run so the two are compared on the same machine state:
  * size: bytes of every graph;
  * step ms: one lm_step call at T = the model's 10 s nonoverlap length (498 for 10 s at 50 Hz), on the rows the
    model's default decoding runs (B, or 2B under guidance), median of --repeats calls;
  * request s: `load_engine(DIR).generate(prompt)` with the model's defaults, text encoding and codec included
    (the text cache cleared each time), median of --repeats requests after --warmup;
  * logits: max |int8 - fp32| and argmax agreement of lm_step on the same half-masked codes, every stage;
  * tokens: the fraction of equal tokens between int8 and fp32 ORT, and between fp32 ORT and torch (the source
    model) for scale, for --prompts prompts with the same seed (sampled, the model's defaults) and greedy.
One JSON line per thread count goes to --json; a summary to stdout.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import host, versions

PROMPTS = ("a fast techno beat with a deep bass", "slow sad piano ballad", "upbeat rock with electric guitars",
           "ambient drone with soft pads", "smooth jazz with a saxophone solo", "hip hop beat with vinyl crackle",
           "orchestral film score with strings", "reggae groove with offbeat guitar")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m magnet_engine.bench quant", description=__doc__.splitlines()[0])
    p.add_argument("--fp32", required=True, help="fp32 export folder")
    p.add_argument("--int8", required=True, help="int8 export folder of the same model")
    p.add_argument("--threads", default="1,2", help="intra-op thread counts, e.g. 1,2")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompts", type=int, default=4, help="prompts for token agreement (at most 8)")
    p.add_argument("--duration", type=float, default=None, help="seconds per request (default: the segment)")
    p.add_argument("--no-tokens", action="store_true", help="skip the token agreement part")
    p.add_argument("--json", default=None, help="append one JSON line per thread count")
    return p


def _options(threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as load_engine's default
    return so


def _sizes(d: Path) -> dict[str, int]:
    m = json.loads((d / "manifest.json").read_text())
    return {name: sum(f["bytes"] for f in g["files"]) for name, g in m["graphs"].items()}


def _step_feeds(eng: Any, frames: int, guided: bool, seed: int = 0) -> dict[str, np.ndarray]:
    cond = eng.text([PROMPTS[0]])
    kv = eng.make_step.cross_kv.run(eng.make_step.kv_names, {"text_embeds": cond.numpy()})
    g = torch.Generator().manual_seed(seed)
    k, card = eng.config.n_q, eng.config.card
    codes = torch.randint(0, card, (1, k, frames), generator=g)
    codes[torch.rand(codes.shape, generator=g) < 0.5] = card
    rows = torch.cat([codes, codes]) if guided else codes
    return {"codes": rows.numpy(), **dict(zip(eng.make_step.kv_names, kv))}


def _median_ms(fn: Any, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).double().mean())


def main(argv: Sequence[str] | None = None) -> int:
    from magnet_engine.export.ort import load_engine

    args = _parser().parse_args(argv)
    dirs = {"fp32": Path(args.fp32), "int8": Path(args.int8)}
    sizes = {k: _sizes(d) for k, d in dirs.items()}
    manifest = json.loads((dirs["int8"] / "manifest.json").read_text())
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        engines = {k: load_engine(d, session_options=_options(threads)) for k, d in dirs.items()}
        gen = engines["fp32"].default_generation()
        if args.duration is not None:
            gen = engines["fp32"].settings(duration=args.duration)
        from magnet_engine.engine.magnet import output_frames

        frames = output_frames(engines["fp32"].config, gen)
        row: dict[str, Any] = {"bench": "quant", "threads": threads, "frames": frames, "guided": gen.guided,
                               "steps": list(gen.steps), "sizes": sizes,
                               "quantization": manifest.get("quantization"), **host(), "versions": versions()}
        feeds = _step_feeds(engines["fp32"], frames, gen.guided)
        logits = {}
        for name, eng in engines.items():
            sess = eng.make_step.lm_step
            stage0 = {**feeds, "stage": np.array(0, dtype=np.int64)}
            row[f"step_ms_{name}"] = _median_ms(lambda s=sess, f=stage0: s.run(["logits"], f), args.repeats)
            logits[name] = [sess.run(["logits"], {**feeds, "stage": np.array(s, dtype=np.int64)})[0]
                            for s in range(eng.config.n_q)]
        row["logit_max_abs_err"] = max(float(np.abs(a - b).max()) for a, b in zip(logits["fp32"], logits["int8"]))
        row["logit_max_abs_ref"] = max(float(np.abs(a).max()) for a in logits["fp32"])
        row["argmax_agreement"] = float(np.mean([(a.argmax(-1) == b.argmax(-1)).mean()
                                                 for a, b in zip(logits["fp32"], logits["int8"])]))
        for name, eng in engines.items():
            def request(e: Any = eng, g: Any = gen) -> None:
                e.text.clear_cache()
                e.generate([PROMPTS[0]], g, seed=0)
            for _ in range(args.warmup):
                request()
            row[f"request_s_{name}"] = _median_ms(request, args.repeats) / 1e3
        if not args.no_tokens and threads == min(int(t) for t in args.threads.split(",")):
            import magnet_engine as me

            prompts = list(PROMPTS[: args.prompts])
            ref = me.load(manifest["source"]["model"], device="cpu")
            for mode, kw in (("sampled", {"seed": 0}), ("greedy", {"greedy": True})):
                out = {k: e.generate(prompts, gen, decode=False, **kw).codes for k, e in engines.items()}
                torch_codes = ref.generate(prompts, gen, decode=False, **kw).codes
                row[f"tokens_int8_vs_fp32_{mode}"] = _agreement(out["int8"], out["fp32"])
                row[f"tokens_fp32_vs_torch_{mode}"] = _agreement(out["fp32"], torch_codes)
                row[f"tokens_int8_vs_fp32_{mode}_stage0"] = _agreement(out["int8"][:, 0], out["fp32"][:, 0])
        print(json.dumps({k: v for k, v in row.items() if k not in ("quantization", "versions", "host")}))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0
