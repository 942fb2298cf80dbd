"""`magnet export --model DIR|ID [--text-encoder DIR] -o/--out DIR [--dtype float32|float16] [--quantize int8]
[--opset N] [--conformance] [--web]`.

Exit codes: 0 done, 1 the export or a check failed, 2 bad usage. Errors are one line on stderr, never a traceback;
progress goes to stderr, the summary line to stdout.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from magnet_engine.engine.cli import SPELLING

PROG = "magnet export"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)  # argparse would print the usage block and exit; we want one line


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Export a MAGNeT model to ONNX graphs (text encoder, cross k/v, one "
                "decoding step, codec) for the onnxruntime backend. Each graph is checked against PyTorch.")
    p.add_argument(*SPELLING["model"], required=True, help="model folder (state_dict.bin + "
                   "compression_state_dict.bin), LM package file, or Hugging Face id (facebook/magnet-small-10secs)")
    p.add_argument("--text-encoder", default=None, help="text encoder folder or id (default: a t5/ folder beside "
                   "the checkpoint, else the one the checkpoint names)")
    p.add_argument(*SPELLING["output"], dest="out", required=True,
                   help="output folder (created; an existing export there is replaced)")
    p.add_argument(*SPELLING["dtype"], default="float32", choices=["float32", "float16"],
                   help="transformer layer precision (text encoder and codec stay float32); default float32. "
                   "float16 is for onnxruntime's CUDA execution provider (on CPU it is slower than float32)")
    p.add_argument("--quantize", default=None, choices=["int8"],
                   help="int8: onnxruntime dynamic int8 quantization of the text encoder, cross k/v and LM step "
                   "(the codec stays float32) for CPU; measured against float32 and recorded in the manifest")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's; >= 18)")
    p.add_argument("--conformance", action="store_true", help="also write OUT/conformance/: greedy and sampled runs' "
                   "inputs (a sampled run's uniforms), tokens, per-step span scores and logits, for a client in any "
                   "language to prove itself against "
                   "(runners: export/conformance.py, export/node/conformance.mjs)")
    p.add_argument("--web", action="store_true", help="also write the web page (OUT/index.html, OUT/web/): the "
                   "model runs in the browser with onnxruntime-web; try it with `python -m magnet_engine.export.web "
                   "OUT` (needs `npm ci --prefix export/node`)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run `magnet export`; returns the exit code."""
    try:
        args = build_parser().parse_args(list(argv) if argv is not None else None)
    except _UsageError as e:
        print(f"{PROG}: error: {e} (see {PROG} --help)", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)

    def log(msg: str) -> None:
        print(f"{PROG}: {msg}", file=sys.stderr, flush=True)

    try:
        from .onnx_export import export_model

        manifest = export_model(args.model, args.out, text_encoder=args.text_encoder, dtype=args.dtype,
                                opset=args.opset, quantize=args.quantize,
                                conformance=args.conformance, log=log)
        if args.web:
            from .web import write_page

            write_page(args.out)
    except (ValueError, TypeError, OSError) as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except ImportError as e:
        print(f"{PROG}: error: {_one_line(e)}; install the ONNX extras: pip install onnx onnxruntime onnxscript",
              file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the exporter's own failures: one line, no traceback, exit 1
        print(f"{PROG}: error: export failed ({type(e).__name__}: {_one_line(e)})", file=sys.stderr)
        return 1
    worst = max(g["check"].get("max_abs_err", 0.0) for g in manifest["graphs"].values())
    quant = "" if not manifest["quantization"] else ", int8 weights (see the manifest's quantization)"
    vectors = ", conformance vectors in conformance/" if args.conformance else ""
    web = f", the web page in index.html (python -m magnet_engine.export.web {args.out} serves it)" if args.web else ""
    print(f"exported {args.model} to {args.out}: {len(manifest['graphs'])} graphs, opset {manifest['opset']}, "
          f"{manifest['dtype']}{quant}, all checks passed (max abs err {worst:.2e}){vectors}{web}")
    return 0


def _one_line(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # the exporter colours its messages
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:500]


if __name__ == "__main__":
    sys.exit(main())
