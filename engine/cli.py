"""`magnet` command line: `magnet generate PROMPT ...`; `magnet export ...` and `magnet serve ...` are found as the
entry points of `magnet_engine.commands` (setup.py), so engine/ imports neither.

Generation flags are built from `GenerationConfig`'s fields (each flag defaults to "the model's default"), so no
default is written here, and the request is checked once, by `Engine.request`, whose errors name the flags
(`CLI_NAMES`). Errors: one line on stderr, exit 2 for usage, 1 for failures, no traceback, no half file. Nothing
heavy is imported before the arguments are checked: `--help` and bad flags answer at once.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .audio import FORMATS, NORMALIZE, SUBTYPES, OutputConfig
from .config import SPAN_ARRANGEMENTS, SPAN_SCORINGS, GenerationConfig, SettingError


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
    "duration": ("--duration", {"type": float, "help": "seconds; past the model's segment, generated window by "
                                                       "window, each continuing from the last --context seconds"}),
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
    "context": ("--context", {"type": float, "metavar": "SECONDS",
                              "help": "past the segment: each window continues from the last SECONDS of tokens "
                                      "(default: half the segment)"}),
}


# How the names in a SettingError (GenerationConfig fields and request parts) are spelled on the command line.
CLI_NAMES: dict[str, str] = {
    **{name: flag for name, (flag, _) in _GEN_FLAGS.items()},
    "prompts": "PROMPT", "unconditional": "--unconditional N", "rescorer": "--rescorer",
    "ar_model": "--ar-model", "prompt_codes": "--prompt-codes", "prompt_audio": "--prompt-audio",
    "output": "-o", "tokens_out": "--tokens-out", "device": "--device", "dtype": "--dtype", "backend": "--backend",
    "graph": "--cuda-graph", "deterministic": "--deterministic",
    "model": "--model", "text_encoder": "--text-encoder", "batch_size": "--batch-size",
    "wav_subtype": "--wav-subtype",
}


# One spelling per option across `magnet generate / export / serve` and `python -m magnet_engine.bench ...`: a
# command with such an option declares it as `add_argument(*SPELLING[name], ...)` (tests/test_cli.py reads every
# --help). `--output` stays an alias of `-o/--out` for the command lines written before.
SPELLING: dict[str, tuple[str, ...]] = {
    "output": ("-o", "--out", "--output"),
    "model": ("--model",),
    "seed": ("--seed",),
    "device": ("--device",),
    "dtype": ("--dtype",),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints usage + message by default)
        self.exit(2, f"magnet: error: {message} (see --help)\n")


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _default_help(name: str, reference: GenerationConfig, shipped: GenerationConfig | None) -> str:
    """Whose default a flag takes: the model's own; for the released MAGNeT checkpoints the reference API's, for the
    shipped default model its config.json's (read without loading it)."""
    ref = _shown(getattr(reference, name))
    if shipped is None or getattr(shipped, name) == getattr(reference, name):
        return f"default: the model's; {ref} for MAGNeT models"
    return f"default: the model's; {ref} for released MAGNeT, {_shown(getattr(shipped, name))} for the shipped default"


def _shipped_defaults() -> GenerationConfig | None:
    from .loading import DEFAULT_MODEL, OWN_CONFIG

    try:
        section = json.loads((DEFAULT_MODEL / OWN_CONFIG).read_text()).get("generation", {})
        return GenerationConfig.from_dict(section)
    except (OSError, ValueError, AttributeError):
        return None  # a damaged install: `magnet_engine.load` will say so when it is used


def build_parser() -> argparse.ArgumentParser:
    from .backends import names as backend_names

    p = _Parser(prog="magnet generate", description="Text to music/sound with MAGNeT (or a MusicGen baseline).")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="text prompts; several -> DIR/0.wav, 1.wav, ...")
    p.add_argument(*SPELLING["output"], dest="output", type=Path,
                   help=f"FILE for one prompt ({', '.join(FORMATS)}: the extension picks the format), or a folder "
                   "(default out.wav / out/)")
    p.add_argument(*SPELLING["model"], help="default (the shipped model, offline), default-ar, a model folder, an LM "
                   "package file, an ONNX export folder (magnet export) or a Hugging Face id "
                   "(facebook/magnet-small-10secs)")
    p.add_argument("--text-encoder", help="local folder of the text encoder (default: from the checkpoint)")
    p.add_argument(*SPELLING["device"], help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument(*SPELLING["dtype"], choices=("float32", "float16", "bfloat16"), help="transformer dtype")
    p.add_argument("--backend", choices=backend_names(),
                   help="default: onnx for an ONNX export folder, else torch; triton = torch with Triton kernels")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="row-invariant linears: the tokens a deterministic `magnet serve` gives this request in any "
                        "batch (default: on on CPU, where it costs ~8%%; off on CUDA)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture the whole decoding program as one CUDA graph per request shape and replay it "
                        "(CUDA, torch or triton backend)")
    p.add_argument("--rescorer", metavar="MODEL", help="an autoregressive (MusicGen) model that rescores MAGNeT's "
                   "tokens every step (paper §3.3); same codec as --model")
    p.add_argument("--ar-model", metavar="MODEL", help="the autoregressive (MusicGen) model that writes the "
                   "--hybrid-prefix; same codec as --model")
    reference, shipped = GenerationConfig(), _shipped_defaults()
    for name, (flag, kw) in _GEN_FLAGS.items():
        kw = dict(kw)
        kw["help"] = f"{kw.get('help', '')} ({_default_help(name, reference, shipped)})".strip()
        p.add_argument(flag, dest=name, default=None, **kw)
    p.add_argument("--batch-size", type=int, help="prompts per forward batch (default: all at once)")
    p.add_argument("--prompt-codes", type=Path, help="FILE.npy [B, K, P] int64 tokens to continue")
    p.add_argument("--prompt-audio", type=Path, help="an audio FILE at the model's codec rate to continue")
    p.add_argument("--tokens-out", type=Path, help="write the generated tokens [B, K, T] int64 to FILE.npy")
    out = OutputConfig()
    p.add_argument("--normalize", choices=NORMALIZE, default=out.normalize)
    p.add_argument("--wav-subtype", choices=tuple(SUBTYPES), default=out.wav_subtype,
                   help=".wav sample format (.flac stores 16-bit PCM, .ogg Vorbis)")
    p.add_argument("--unconditional", type=int, metavar="N", help="N samples without text")
    p.add_argument("--quiet", action="store_true", help="no progress bar or status line")
    return p


def _outputs(args: argparse.Namespace, n: int) -> list[Path]:
    """The files to write, checked (format, folder, writable) before anything is loaded."""
    from .audio import audio_format, check_writable

    out: Path | None = args.output
    if n == 1 and (out is None or (out.suffix and not out.is_dir())):
        paths = [out or Path("out.wav")]
    else:
        folder = out or Path("out")
        if folder.suffix.lower() in FORMATS:
            raise SettingError(f"{n} prompts need a folder for <output>, not the file {folder}")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SettingError(f"cannot create output folder {folder}: {e.strerror}; choose another <output>") from e
        paths = [folder / f"{i}.wav" for i in range(n)]
    for path in paths:
        audio_format(path)
        check_writable(path)
    return paths


@contextlib.contextmanager
def _status(text: str, quiet: bool) -> Iterator[None]:
    """A one-line status on a terminal when what runs inside takes more than a second; erased afterwards."""
    if quiet or not sys.stderr.isatty():
        yield
        return
    shown = threading.Event()

    def show() -> None:
        print(f"magnet: {text}...", end="\r", file=sys.stderr, flush=True)
        shown.set()

    timer = threading.Timer(1.0, show)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        if shown.is_set():
            print("\r\033[K", end="", file=sys.stderr, flush=True)


def _prompt_list(args: argparse.Namespace) -> list[str | None]:
    if args.unconditional is None:
        return list(args.prompts)
    if args.prompts:
        raise SettingError("give <prompts> or <unconditional>, not both")
    if args.unconditional <= 0:
        raise SettingError(f"<unconditional> needs a positive count, got {args.unconditional}")
    return [None] * args.unconditional


def generate_main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    from .request import check_levers, check_prompts

    # everything the arguments alone decide, before the slow imports and the model load
    prompts = list(check_prompts(_prompt_list(args)))
    overrides = {name: getattr(args, name) for name in _GEN_FLAGS if getattr(args, name) is not None}
    check_levers(GenerationConfig(**overrides), overrides, has_rescorer=args.rescorer is not None,
                 has_ar_model=args.ar_model is not None)
    if args.batch_size is not None and args.batch_size <= 0:
        raise SettingError(f"<batch_size> must be positive, got {args.batch_size}")
    paths = _outputs(args, len(prompts))
    if args.tokens_out is not None:
        from .audio import check_writable

        if args.tokens_out.suffix != ".npy":
            raise SettingError(f"<tokens_out> writes a .npy file, not {args.tokens_out.name}")
        check_writable(args.tokens_out)
    for path, name in ((args.prompt_codes, "prompt_codes"), (args.prompt_audio, "prompt_audio")):
        if path is not None and not path.is_file():
            raise SettingError(f"cannot read <{name}> {path}: {'it is a folder' if path.is_dir() else 'no such file'}")

    with _status(f"loading {args.model or 'the default model'}", args.quiet):
        import numpy as np
        import torch

        from .audio import normalize, read_wav, write_audio
        from .backends import load
        from .results import join

        prompt_codes = None
        if args.prompt_codes is not None:
            try:
                prompt_codes = torch.from_numpy(np.load(args.prompt_codes, allow_pickle=False))
            except (OSError, ValueError) as e:
                raise SettingError(f"cannot read <prompt_codes> {args.prompt_codes}: {e}") from e
        eng = load(args.model, backend=args.backend, text_encoder=args.text_encoder, device=args.device,
                   dtype=args.dtype, graph=args.cuda_graph, deterministic=args.deterministic)
        companions = _load_companions(args)
    prompt_audio = None if args.prompt_audio is None else read_wav(args.prompt_audio, eng.sample_rate)
    request = eng.request(prompts, prompt_codes=prompt_codes, prompt_audio=prompt_audio, **companions, **overrides)

    parts = request.split(args.batch_size or request.batch)
    bar = _progress(args.quiet)
    audios, codes = [], []
    for chunk, part in enumerate(parts):
        progress: Callable[[int, int], None] | None = None
        if bar is not None:
            def progress(done: int, total: int, chunk: int = chunk) -> None:
                # the loop reports its own total (MAGNeT steps, AR frames, hybrid prefix + steps)
                if bar.total != len(parts) * total:
                    bar.total = len(parts) * total
                bar.update(chunk * total + done - bar.n)
        pieces = []
        for piece in eng.generate_stream(part, progress=progress):  # one piece per window past the segment
            pieces.append(piece)
            if piece.windows > 1 and not args.quiet:
                done = sum(p.codes.shape[-1] for p in pieces) / eng.config.frame_rate
                _say(f"window {piece.window + 1}/{piece.windows} done: {done:g}s of audio", bar)
        out = join(pieces, eng.sample_rate)
        audios.append(out.audio.cpu())
        codes.append(out.codes.cpu())
    if bar is not None:
        bar.close()
    for path, wav in zip(paths, torch.cat(audios)):
        write_audio(path, normalize(wav, eng.sample_rate, args.normalize), eng.sample_rate, args.wav_subtype)
    if args.tokens_out is not None:
        np.save(args.tokens_out, torch.cat(codes).numpy().astype(np.int64))
    if not args.quiet:  # the seed drawn when none was given: --seed S reproduces the run
        print(f"wrote {', '.join(map(str, paths))} (seed {request.gen.seed})", file=sys.stderr)
    return 0


def _load_companions(args: argparse.Namespace) -> dict[str, Any]:
    """--rescorer / --ar-model engines (torch, same device and dtype; their own text encoders), loaded once."""
    from .backends import load

    out: dict[str, Any] = {}
    for key, model in (("rescorer", args.rescorer), ("ar_model", args.ar_model)):
        if model is not None:
            same = next((e for k, e in out.items() if getattr(args, k) == model), None)
            out[key] = same if same is not None else load(model, backend="torch", device=args.device, dtype=args.dtype)
    return out


def _say(text: str, bar: Any) -> None:
    """One line on stderr, above the progress bar when one is drawn."""
    if bar is not None:
        bar.write(f"magnet: {text}", file=sys.stderr)
    else:
        print(f"magnet: {text}", file=sys.stderr)


def _progress(quiet: bool):  # noqa: ANN202 - tqdm bar or None
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=None, delay=1.0, file=sys.stderr, unit="step", leave=False)


# Subcommands of packages above engine/ (setup.py: `export = export.cli:main`, `serve = serve.cli:main`), found by
# name so that engine imports none of them (as engine.backends finds its plug-ins); each is `main(argv) -> exit code`.
COMMANDS_GROUP = "magnet_engine.commands"


def _plugin_commands() -> dict[str, Callable[[Sequence[str]], int]]:
    from importlib.metadata import entry_points

    def lazy(ep: Any) -> Callable[[Sequence[str]], int]:
        return lambda argv: ep.load()(list(argv))  # imported only when run

    return {ep.name: lazy(ep) for ep in entry_points(group=COMMANDS_GROUP)}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"generate": generate_main, **dict(sorted(_plugin_commands().items()))}
    names = ",".join(commands)
    if not argv or argv[0] in ("-h", "--help"):
        what = {"generate": "text -> audio (.wav, .flac, .ogg)", "export": "ONNX export"}
        print(f"usage: magnet {{{names}}} ...\n"
              + "".join(f"  {n:<9} {what.get(n, f'see magnet {n} --help')}\n" for n in commands)
              + "Run `magnet generate --help` for the options.", file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    if argv[0] not in commands:
        print(f"magnet: error: unknown command {argv[0]!r}; use `magnet generate PROMPT` or one of {names}",
              file=sys.stderr)
        return 2
    try:
        return commands[argv[0]](argv[1:])
    except SettingError as e:  # a bad argument, found before or after the load: named as the flag
        print(f"magnet: error: {e.spelled(CLI_NAMES)}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError) as e:
        print(f"magnet: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("magnet: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse: --help (0) or a usage error it already printed (2)
        return e.code if isinstance(e.code, int) else 2


if __name__ == "__main__":
    sys.exit(main())
