"""magnet_engine: an inference engine for MAGNeT (masked non-autoregressive audio generation) on CPU or GPU.

    import magnet_engine as me
    eng = me.load()                                   # the shipped default model; a Hugging Face id; a folder
    out = eng.generate(["a calm ambient pad"], seed=0)  # out.audio [B, 1, samples], out.codes [B, K, T]

The repository's top-level folders are this package's subpackages: `magnet_engine.engine` (model, decoding,
request, scheduler, API, CLI), `.kernels` (Triton), `.export` (ONNX and onnxruntime), `.serve` (Ray Serve),
`.bench`, `.train`. A wheel holds them under magnet_engine/ (setup.py's package_dir); in a source checkout this
package's path also reaches the repository root, so an editable install and a plain checkout import the same files.
None of the folders has an `__init__.py`: run from the repository root (where `python -m` puts it first on
`sys.path`), a folder such as `kernels/` is only a namespace portion and never shadows another distribution's
package of that name (Hugging Face's `kernels`, which transformers imports).

Kept light: importing this package imports no torch; the API below is loaded on first use.
"""
from __future__ import annotations

import os
from typing import Any

_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_checkout, "setup.py")) and os.path.isdir(os.path.join(_checkout, "engine")):
    __path__.append(_checkout)  # a source checkout: the subpackages are this folder's siblings

from .engine.config import GenerationConfig, ModelConfig  # noqa: E402 - after the path is complete

# name -> the module (under this package) that defines it; imported on first access (PEP 562)
_LAZY = {
    "load": "engine.backends", "Engine": "engine.api", "Generation": "engine.api", "Chunk": "engine.api",
    "Request": "engine.request", "SettingError": "engine.config",
    "Scheduler": "engine.scheduler", "QueueFull": "engine.scheduler", "RequestTimeout": "engine.scheduler",
    "Client": "serve.client", "ServiceError": "serve.client",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["GenerationConfig", "ModelConfig", *_LAZY]
