"""MAGNeT inference engine. `engine.load(model)` -> Engine; `Engine.generate(prompts, ...)` -> audio + tokens.

Kept light: heavy dependencies (transformers, triton, onnxruntime) are imported where they are used.
"""
from .config import GenerationConfig, ModelConfig


def load(*args, **kwargs):  # noqa: ANN002, ANN003 - thin lazy re-export of engine.api.load
    """See `engine.api.load`."""
    from .api import load as _load

    return _load(*args, **kwargs)


__all__ = ["GenerationConfig", "ModelConfig", "load"]
