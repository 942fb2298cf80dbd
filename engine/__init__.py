"""MAGNeT inference engine. `engine.load(model)` -> Engine; `Engine.generate(prompts, ...)` -> audio + tokens.

Kept light: heavy dependencies (transformers, triton, onnxruntime) are imported where they are used.
"""
from .config import GenerationConfig, ModelConfig


def load(*args, **kwargs):  # noqa: ANN002, ANN003 - thin lazy re-export of engine.api.load
    """See `engine.api.load`."""
    from .api import load as _load

    return _load(*args, **kwargs)


def __getattr__(name: str):  # noqa: ANN202 - lazy: the scheduler imports torch
    if name in ("Scheduler", "QueueFull", "RequestTimeout"):
        from . import scheduler

        return getattr(scheduler, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


__all__ = ["GenerationConfig", "ModelConfig", "QueueFull", "RequestTimeout", "Scheduler", "load"]
