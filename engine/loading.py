"""Finding and reading checkpoints: audiocraft packages (`state_dict.bin` + `compression_state_dict.bin`, released
MAGNeT/MusicGen format) from a folder, a file or a Hugging Face id. Never unpickles code: weights_only=True."""
from __future__ import annotations

import contextlib
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and yaml are imported where used: the CLI reads the shipped models' paths without them
    import torch

LM_FILE = "state_dict.bin"
CODEC_FILE = "compression_state_dict.bin"


def load_weights_only(path: Path, what: str = "checkpoint") -> Any:
    """torch.load with weights_only=True; every failure becomes a ValueError naming the file and the fix."""
    import torch

    if not path.is_file():
        raise ValueError(f"{what} file {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing: one message
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # the weights-only unpickler met a global (os.system, ...) or an opcode it does not allow; garbage bytes
        # fail the same way, so the message names both. Either way nothing was executed.
        raise ValueError(f"{path} is truncated or not a torch checkpoint, or holds objects whose unpickling could "
                         "run code; refusing to load it (only plain weights are read)") from None
    except Exception as e:  # noqa: BLE001 - torch.load raises RuntimeError/EOFError/KeyError/UnicodeDecodeError...
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{path} is truncated or not a torch checkpoint ({type(e).__name__}: {first}); "
                         "download it again") from None


def read_package(path: Path, what: str = "checkpoint") -> dict[str, Any]:
    """An audiocraft package: a dict with 'best_state' (flat state dict) and 'xp.cfg' (YAML text)."""
    pkg = load_weights_only(path, what)
    if not isinstance(pkg, dict) or "best_state" not in pkg or "xp.cfg" not in pkg:
        raise ValueError(f"{path} is not an audiocraft package (needs 'best_state' and 'xp.cfg'); "
                         f"expected a released {what} such as state_dict.bin / compression_state_dict.bin")
    return pkg


def parse_xp_cfg(pkg: dict[str, Any], path: Path) -> dict[str, Any]:
    import yaml

    cfg = pkg["xp.cfg"]
    if isinstance(cfg, str):
        try:
            cfg = yaml.safe_load(cfg)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: xp.cfg is not valid YAML ({e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: xp.cfg is not a mapping")
    return cfg


def resolve_files(model: str | Path) -> tuple[Path, Path]:
    """-> (LM package, codec package). `model` is a folder, an LM package file (codec beside it), or an HF id.

    Hugging Face ids resolve through the local cache first and only then the network.
    """
    path = Path(model)
    if path.is_dir():
        return path / LM_FILE, path / CODEC_FILE
    if path.is_file():
        return path, path.parent / CODEC_FILE
    if str(model).count("/") == 1 and not str(model).startswith((".", "/")):
        return _hub_file(str(model), LM_FILE), _hub_file(str(model), CODEC_FILE)
    raise ValueError(f"model {str(model)!r} not found: pass a folder holding {LM_FILE} and {CODEC_FILE}, "
                     "an LM package file, or a Hugging Face id such as facebook/magnet-small-10secs")


def _hub_file(repo: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, local_files_only=True))
    except Exception:  # noqa: BLE001 - huggingface_hub raises several types for "not cached"; go online next
        pass
    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as e:  # noqa: BLE001 - network, auth and missing-repo errors all mean the same to the user
        raise ValueError(f"cannot fetch {filename} of {repo!r} ({type(e).__name__}); check the id and network, "
                         "or pass a local folder with --model") from e


# ---------------------------------------------------------------------------------------------- our own format
# A folder: config.json {"format": FORMAT, "version": 1, "model": ModelConfig, "codec": CodecConfig} beside
# lm.safetensors (the LM with our module names) and codec.safetensors. No pickle anywhere.
FORMAT = "magnet-engine"
OWN_CONFIG, OWN_LM, OWN_CODEC = "config.json", "lm.safetensors", "codec.safetensors"
DEFAULT_MODEL = Path(__file__).resolve().parent / "assets" / "magnet-default"
# names for the models shipped in the package: `--model default-ar` (our MusicGen-style model, e.g. a rescorer)
SHIPPED = {"default": DEFAULT_MODEL, "default-ar": DEFAULT_MODEL.parent / "musicgen-default"}


def resolve_named(model: str | Path | None) -> str | Path:
    """None -> the shipped default; "default" / "default-ar" -> the shipped folders; anything else unchanged."""
    if model is None:
        return DEFAULT_MODEL
    return SHIPPED.get(model, model) if isinstance(model, str) else model


def checkpoint_files(model: str | Path | None) -> list[Path]:
    """The files a model is read from (for hashes in export manifests): our format's three, or the two packages."""
    model = resolve_named(model)
    if is_own_format(Path(model)):
        return [Path(model) / name for name in (OWN_CONFIG, OWN_LM, OWN_CODEC)]
    return list(resolve_files(model))


def is_own_format(folder: Path) -> bool:
    return folder.is_dir() and (folder / OWN_CONFIG).is_file() and (folder / OWN_LM).is_file()


def save_pretrained(folder: Path, lm: torch.nn.Module, codec: torch.nn.Module, dtype: torch.dtype | None = None,
                    generation: dict[str, Any] | None = None) -> None:
    """Write a model in our format. LM weights in `dtype` (default fp16: it halves the size; the released models
    ship fp16). `generation`: the model's own default GenerationConfig fields (e.g. {"steps": [10, 3, 3, 3]})."""
    import dataclasses
    import json

    import torch
    from safetensors.torch import save_file

    dtype = torch.float16 if dtype is None else dtype

    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "version": 1, "model": lm.cfg.to_dict(),
              "codec": dataclasses.asdict(codec.config), "generation": generation or {}}
    (folder / OWN_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().to(dtype).contiguous().cpu() if v.is_floating_point() else v.contiguous().cpu()
               for k, v in lm.state_dict().items()}, folder / OWN_LM)
    save_file({k: v.detach().contiguous().cpu() for k, v in codec.state_dict().items()}, folder / OWN_CODEC)


def read_own_format(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """-> (config dict, LM state, codec state), with clear errors for a damaged folder."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / OWN_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder / OWN_CONFIG} is unreadable ({e}); restore the model folder") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT or config.get("version") != 1:
        raise ValueError(f"{folder / OWN_CONFIG} is not a {FORMAT} v1 config; save it with engine.save_pretrained")
    states = []
    for name in (OWN_LM, OWN_CODEC):
        try:
            states.append(load_file(folder / name))
        except (OSError, SafetensorError) as e:
            raise ValueError(f"{folder / name} is missing, truncated or not safetensors ({e}); restore it") from e
    return config, states[0], states[1]


def float_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every floating tensor in fp32 (others unchanged): one conversion per source dtype into one
    flat buffer, the tensors views of it. A conversion per tensor hands each to the thread pool, which on a busy
    2-core CPU cost 30-260 ms for the default model's 120 tensors against ~15 ms for one."""
    import torch

    out = dict(state)
    for dtype in {v.dtype for v in state.values() if v.is_floating_point() and v.dtype != torch.float32}:
        names = [k for k, v in state.items() if v.dtype == dtype]
        flat = torch.cat([state[k].reshape(-1) for k in names]).float()
        for k, part in zip(names, flat.split([state[k].numel() for k in names])):
            out[k] = part.view(state[k].shape)
    return out


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Modules built inside hold no memory and are never initialised: they are on the meta device, and torch.nn.init's
    fills are skipped (on meta they would run torch's Python reference ops, whose first use imports torch._dynamo:
    1.5 s of a 2-core process). The caller then assigns every weight (`load_state_dict(..., assign=True)`)."""
    import torch
    from torch.overrides import TorchFunctionMode

    class SkipInit(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
            kwargs = kwargs or {}
            if getattr(func, "__module__", None) == "torch.nn.init":  # init.normal_(tensor, ...): leave it as is
                return args[0] if args else kwargs["tensor"]
            return func(*args, **kwargs)

    with torch.device("meta"), SkipInit():
        yield

