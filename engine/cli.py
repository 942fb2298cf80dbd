"""`magnet` command line: `magnet generate PROMPT ...` and `magnet export ...`.

Generation flags are built from `GenerationConfig`'s fields (each flag defaults to "the model's default"), so no
default is written here. Errors: one line on stderr, exit 2 for usage, 1 for failures, no traceback, no half file.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .audio import NORMALIZE, SUBTYPES, OutputConfig
from .config import SPAN_ARRANGEMENTS, SPAN_SCORINGS, GenerationConfig

BACKENDS = ("torch", "triton", "onnx")


class UsageError(ValueError):
    """Bad command line: exit 2."""


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


# GenerationConfig field -> (flag, argparse keywords). Defaults come from the dataclass / the model.
_GEN_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "duration": ("--duration", {"type": float, "help": "seconds (at most the model's segment)"}),
    "steps": ("--steps", {"type": _ints, "help": "MAGNeT decoding steps per codebook, e.g. 20,10,10,10"}),
    "greedy": ("--greedy", {"action": "store_const", "const": True, "help": "argmax decoding (deterministic)"}),
    "temperature": ("--temperature", {"type": float}),
    "anneal_temp": ("--no-anneal-temp", {"action": "store_const", "const": False,
                                         "help": "keep the temperature constant within a stage"}),
    "top_k": ("--top-k", {"type": int, "help": "0 = off"}),
    "top_p": ("--top-p", {"type": float, "help": "0 = off; takes precedence over top-k"}),
    "cfg": ("--cfg", {"type": _floats, "help": "guidance: MAX,MIN annealed with the mask rate, or one constant"}),
    "span_arrangement": ("--span-arrangement", {"choices": SPAN_ARRANGEMENTS}),
    "span_scoring": ("--span-scoring", {"choices": SPAN_SCORINGS}),
    "seed": ("--seed", {"type": int, "help": "seed of the sampling noise"}),
    "rescore_weight": ("--rescore-weight", {"type": float, "metavar": "W",
                                            "help": "span scores use W·p_magnet + (1-W)·p_rescorer; needs --rescorer"}),
    "ar_cfg": ("--ar-cfg", {"type": float, "help": "constant guidance of --rescorer / --ar-model "
                                                   "(default: that model's own, 3.0 for MusicGen)"}),
    "hybrid_prefix": ("--hybrid-prefix", {"type": float, "metavar": "SECONDS",
                                          "help": "first SECONDS by --ar-model, the rest by MAGNeT; 0 = off"}),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints usage + message by default)
        self.exit(2, f"magnet: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="magnet generate", description="Text to music/sound with MAGNeT (or a MusicGen baseline).")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="text prompts; several -> DIR/0.wav, 1.wav, ...")
    p.add_argument("-o", "--output", type=Path, help="FILE.wav for one prompt, or a folder (default out.wav / out/)")
    p.add_argument("--model", help="folder, LM package file, ONNX export folder or Hugging Face id")
    p.add_argument("--text-encoder", help="local folder of the text encoder (default: from the checkpoint)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="transformer dtype")
    p.add_argument("--backend", choices=BACKENDS, default=BACKENDS[0])
    p.add_argument("--rescorer", metavar="MODEL", help="an autoregressive (MusicGen) model that rescores MAGNeT's "
                   "tokens every step (paper §3.3); same codec as --model")
    p.add_argument("--ar-model", metavar="MODEL", help="the autoregressive (MusicGen) model that writes the "
                   "--hybrid-prefix; same codec as --model")
    defaults = GenerationConfig()
    for name, (flag, kw) in _GEN_FLAGS.items():
        default = getattr(defaults, name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        kw = dict(kw)
        kw["help"] = f"{kw.get('help', '')} (MAGNeT default: {shown})".strip()
        p.add_argument(flag, dest=name, default=None, **kw)
    p.add_argument("--batch-size", type=int, help="prompts per forward batch (default: all at once)")
    p.add_argument("--prompt-codes", type=Path, help="FILE.npy [B, K, P] int64 tokens to continue")
    p.add_argument("--prompt-audio", type=Path, help="FILE.wav at the codec's rate to continue")
    p.add_argument("--tokens-out", type=Path, help="write the generated tokens [B, K, T] int64 to FILE.npy")
    out = OutputConfig()
    p.add_argument("--normalize", choices=NORMALIZE, default=out.normalize)
    p.add_argument("--wav-subtype", choices=tuple(SUBTYPES), default=out.wav_subtype)
    p.add_argument("--unconditional", type=int, metavar="N", help="N samples without text")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _outputs(args: argparse.Namespace, n: int) -> list[Path]:
    from .audio import check_writable

    out = args.output
    if n == 1 and (out is None or out.suffix.lower() == ".wav"):
        paths = [out or Path("out.wav")]
    else:
        folder = out or Path("out")
        if folder.suffix.lower() == ".wav":
            raise UsageError(f"{n} prompts need a folder for -o, not the file {folder}")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create output folder {folder}: {e.strerror}; choose another -o") from e
        paths = [folder / f"{i}.wav" for i in range(n)]
    for path in paths:
        try:
            check_writable(path)
        except ValueError as e:
            raise UsageError(str(e)) from e
    return paths


def _load_engine(args: argparse.Namespace):  # noqa: ANN202 - returns engine.api.Engine
    if args.backend == "onnx":
        from export.ort import load_engine

        if args.model is None:
            raise UsageError("--backend onnx needs --model EXPORT_DIR (made by `magnet export`)")
        return load_engine(args.model, device=args.device or "cpu")
    from .api import load

    eng = load(args.model, text_encoder=args.text_encoder, device=args.device, dtype=args.dtype)
    if args.backend == "triton":
        import kernels

        kernels.apply(eng)
    return eng


def generate_main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    import numpy as np
    import torch

    from .audio import normalize, read_wav, write_wav

    if args.unconditional is not None:
        if args.prompts:
            raise UsageError("give prompts or --unconditional N, not both")
        if args.unconditional <= 0:
            raise UsageError(f"--unconditional needs a positive count, got {args.unconditional}")
        prompts: list[str | None] = [None] * args.unconditional
    else:
        prompts = list(args.prompts)
    if not prompts:
        raise UsageError("no prompt given: pass one or more PROMPTs, or --unconditional N")
    if args.batch_size is not None and args.batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    overrides = {name: getattr(args, name) for name in _GEN_FLAGS if getattr(args, name) is not None}
    try:
        dataclasses.replace(GenerationConfig(), **overrides)  # range checks before the (slow) model load
    except ValueError as e:
        raise UsageError(str(e)) from e
    _check_levers(args, overrides)
    paths = _outputs(args, len(prompts))
    if args.tokens_out is not None:
        _outputs_check(args.tokens_out)
    prompt_codes = None
    if args.prompt_codes is not None:
        try:
            prompt_codes = torch.from_numpy(np.load(args.prompt_codes, allow_pickle=False))
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read --prompt-codes {args.prompt_codes}: {e}") from e

    eng = _load_engine(args)
    companions = _load_companions(args)
    try:
        gen = eng.settings(**overrides)
        from .hybrid import check_request

        check_request(eng, gen, companions.get("rescorer"), companions.get("ar_model"), set(overrides))
    except ValueError as e:
        raise UsageError(str(e)) from e
    prompt_audio = read_wav(args.prompt_audio, eng.sample_rate) if args.prompt_audio is not None else None
    if prompt_audio is not None:
        prompt_audio = prompt_audio.expand(len(prompts), -1, -1)

    bs = args.batch_size or len(prompts)
    n_chunks = -(-len(prompts) // bs)
    bar = _progress(args.quiet)
    audios, codes = [], []
    for chunk, start in enumerate(range(0, len(prompts), bs)):
        part = slice(start, start + bs)
        progress: Callable[[int, int], None] | None = None
        if bar is not None:
            def progress(done: int, total: int, chunk: int = chunk) -> None:
                # the loop reports its own total (MAGNeT steps, AR frames, hybrid prefix + steps)
                if bar.total != n_chunks * total:
                    bar.total = n_chunks * total
                bar.update(chunk * total + done - bar.n)
        try:
            out = eng.generate(prompts[part], gen,
                               prompt_codes=None if prompt_codes is None else _slice_batch(prompt_codes, part),
                               prompt_audio=None if prompt_audio is None else prompt_audio[part],
                               progress=progress, **companions)
        except (ValueError, TypeError) as e:
            raise UsageError(str(e)) from e
        audios.append(out.audio.cpu())
        codes.append(out.codes.cpu())
    if bar is not None:
        bar.close()
    audio = torch.cat(audios)
    for path, wav in zip(paths, audio):
        write_wav(path, normalize(wav, eng.sample_rate, args.normalize), eng.sample_rate, args.wav_subtype)
    if args.tokens_out is not None:
        np.save(args.tokens_out, torch.cat(codes).numpy().astype(np.int64))
    if not args.quiet:
        print(f"wrote {', '.join(map(str, paths))}", file=sys.stderr)
    return 0


def _check_levers(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    """Flag combinations that need a second model, checked before any model loads."""
    if "rescore_weight" in overrides and args.rescorer is None:
        raise UsageError("--rescore-weight needs --rescorer MODEL (an autoregressive MusicGen checkpoint)")
    if overrides.get("hybrid_prefix", 0.0) > 0 and args.ar_model is None:
        raise UsageError("--hybrid-prefix needs --ar-model MODEL (an autoregressive MusicGen checkpoint)")
    if args.ar_model is not None and not overrides.get("hybrid_prefix", 0.0) > 0:
        raise UsageError("--ar-model is used only by the hybrid: add --hybrid-prefix SECONDS")
    if "ar_cfg" in overrides and args.rescorer is None and args.ar_model is None:
        raise UsageError("--ar-cfg is the guidance of --rescorer / --ar-model: give one of them")


def _load_companions(args: argparse.Namespace) -> dict[str, Any]:
    """--rescorer / --ar-model engines (torch, same device and dtype; their own text encoders), loaded once."""
    from .api import load

    out: dict[str, Any] = {}
    for key, model in (("rescorer", args.rescorer), ("ar_model", args.ar_model)):
        if model is not None:
            same = next((e for k, e in out.items() if getattr(args, k) == model), None)
            out[key] = same if same is not None else load(model, device=args.device, dtype=args.dtype)
    return out


def _outputs_check(path: Path) -> None:
    from .audio import check_writable

    try:
        check_writable(path)
    except ValueError as e:
        raise UsageError(str(e)) from e


def _slice_batch(codes, part: slice):  # noqa: ANN001, ANN202 - [B, K, P] tensor; a single item serves every prompt
    return codes if codes.dim() == 3 and codes.shape[0] == 1 else codes[part]


def _progress(quiet: bool):  # noqa: ANN202 - tqdm bar or None
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=None, delay=1.0, file=sys.stderr, unit="step", leave=False)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"generate": generate_main, "export": _export_main}
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: magnet {generate,export} ...\n  generate  text -> WAV\n  export    ONNX export\n"
              "Run `magnet generate --help` for the options.", file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    if argv[0] not in commands:
        print(f"magnet: error: unknown command {argv[0]!r}; use `magnet generate PROMPT` or `magnet export`",
              file=sys.stderr)
        return 2
    try:
        return commands[argv[0]](argv[1:])
    except UsageError as e:
        print(f"magnet: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError) as e:
        print(f"magnet: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("magnet: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse: --help (0) or a usage error it already printed (2)
        return e.code if isinstance(e.code, int) else 2


def _export_main(argv: Sequence[str]) -> int:
    from export.cli import main as export_main

    return export_main(list(argv))


if __name__ == "__main__":
    sys.exit(main())
