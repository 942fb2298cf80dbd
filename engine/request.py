"""A generation request, validated once: prompts, settings, a prompt to continue and the quality levers' AR model.

Every front end (the CLI, `Engine.generate`, the benchmarks, the scheduler, the HTTP service) builds one with
`Engine.request(...)` (which calls `build_request`) before any model work and hands it on; nothing downstream
checks it again. Errors are `SettingError`s (ValueError) whose `<field>` names each front end spells its own way:
`str(e)` in Python's keywords, `e.spelled(...)` in CLI flags or JSON keys.
"""
from __future__ import annotations

import dataclasses
import math
import re
import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import (
    FIELD_RULES,
    MAX_SEED,
    GenerationConfig,
    ModelConfig,
    Rule,
    SettingError,
    SettingTypeError,
    context_range,
    first_window,
    output_frames,
)

# A prompt holds a character that is not whitespace (str.isspace, which Python's `re` follows): a JSON Schema
# pattern (search semantics) as the HTTP service states it, evaluated with Python's `re`.
PROMPT_PATTERN = r"\S"

if TYPE_CHECKING:  # torch and the decoding modules are imported where used: the CLI checks prompts without them
    import torch

    from .musicgen import ARCompanion


@dataclass(frozen=True, eq=False)
class Request:
    """B prompts and their settings, checked against `model`. Equal when built from equal inputs."""

    model: ModelConfig  # what it was validated for
    prompts: tuple[str | None, ...]  # B texts; None = unconditional
    gen: GenerationConfig  # the model's defaults, then the caller's config and fields; its seed always set
    prompt_codes: torch.Tensor | None = None  # [B, K, P] int64 in [0, V): the first P frames are fixed
    prompt_audio: torch.Tensor | None = None  # [B, 1, samples] fp32 at the codec's rate, encoded when generating
    rescorer: ARCompanion | None = None  # engine.rescore's AR model
    ar_model: ARCompanion | None = None  # engine.hybrid's AR model

    @property
    def batch(self) -> int:
        return len(self.prompts)

    def split(self, size: int) -> list[Request]:
        """Requests of at most `size` prompts each (their prompt rows with them), in order, without re-checking.
        Prompt b keeps its seed + b: a part starting at prompt i has seed + i."""
        if size <= 0:
            raise SettingError(f"<batch_size> must be positive, got {size}")
        return [dataclasses.replace(self, prompts=self.prompts[i:i + size],
                                    gen=dataclasses.replace(self.gen, seed=self.gen.seed + i),
                                    prompt_codes=_rows(self.prompt_codes, i, size),
                                    prompt_audio=_rows(self.prompt_audio, i, size))
                for i in range(0, self.batch, size)]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Request):
            return NotImplemented
        return (self.model == other.model and self.prompts == other.prompts and self.gen == other.gen
                and _same(self.prompt_codes, other.prompt_codes) and _same(self.prompt_audio, other.prompt_audio)
                and self.rescorer is other.rescorer and self.ar_model is other.ar_model)

    __hash__ = None  # type: ignore[assignment] - holds tensors


def _rows(x: torch.Tensor | None, start: int, size: int) -> torch.Tensor | None:
    return None if x is None else x[start:start + size]


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    import torch

    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def build_request(model: ModelConfig, defaults: GenerationConfig, *, sample_rate: int, device: torch.device,
                  prompts: str | Sequence[str | None], config: GenerationConfig | None = None,
                  prompt_codes: torch.Tensor | None = None, prompt_audio: torch.Tensor | None = None,
                  rescorer: Any = None, ar_model: Any = None, **fields: Any) -> Request:
    """Check everything that can be checked without running a model, and return the request.

    `config` (default: the model's `defaults`) is overridden by `fields` (GenerationConfig names). `rescorer` /
    `ar_model`: an `ARCompanion` or an object with `.companion()` (an `Engine` of a MusicGen model)."""
    from .hybrid import prefix_frames  # torch: imported when a request is built (the CLI checks prompts without it)

    texts = check_prompts(prompts)
    gen = settings(model, defaults, config, fields)
    check_levers(gen, fields, has_rescorer=rescorer is not None, has_ar_model=ar_model is not None)
    if gen.seed is None:  # every request has a seed, drawn here per request: reported with the answer, reproducible
        gen = dataclasses.replace(gen, seed=secrets.randbelow(MAX_SEED - len(texts) + 2))  # prompt b: seed + b
    res = None if rescorer is None else companion_of(rescorer, "rescorer", model, sample_rate, device)
    ar = None if ar_model is None else companion_of(ar_model, "ar_model", model, sample_rate, device)
    # a long piece (engine.longform): the levers and a prompt act on its first window, one plain segment
    first = first_window(model, gen)
    frames = output_frames(model, first)
    if res is not None and frames > res.config.max_frames:
        raise SettingError(f"the rescorer's segment ({res.config.segment_duration:g}s) is shorter than the "
                           f"generation ({frames / model.frame_rate:g}s); ask for a shorter <duration>")
    if ar is not None:
        prefix_frames(model, first)
    codes = check_prompt_codes(prompt_codes, prompt_audio, len(texts), model, frames)
    audio = check_prompt_audio(prompt_audio, len(texts), model, sample_rate, frames)
    return Request(model, texts, gen, codes, audio, res, ar)


def settings(model: ModelConfig, defaults: GenerationConfig, config: GenerationConfig | None,
             fields: dict[str, Any]) -> GenerationConfig:
    """The one validator of settings: the model's `defaults`, then `config`, then `fields` (GenerationConfig names),
    checked against `model`. Its seed is left as given (`build_request` draws one when None)."""
    if config is not None and not isinstance(config, GenerationConfig):
        raise SettingTypeError(f"<config> must be a GenerationConfig, got {type(config).__name__}")
    gen = dataclasses.replace(config if config is not None else defaults, **GenerationConfig.check_fields(fields))
    gen.check_for(model)
    return gen


def request_rules(model: ModelConfig) -> dict[str, Rule]:
    """The GenerationConfig fields a text-to-audio request without AR models takes for `model` (Engine.request
    without rescorer / ar_model: all the scheduler serves), each with its rule: FIELD_RULES tightened by `check_for`
    (steps per codebook, top_k, the shortest duration, the long-form context) and `check_levers` (rescore_weight and
    ar_cfg need an AR model, so they are not taken; without one the hybrid is off: hybrid_prefix 0). Values that
    these rules take pass `build_request`, and others are refused by it: the HTTP service's request schema is built
    from them (serve.http)."""
    rules = {name: rule for name, rule in FIELD_RULES.items() if name not in ("rescore_weight", "ar_cfg")}
    if model.kind == "magnet":
        rules["steps"] = dataclasses.replace(rules["steps"], sizes=(model.n_q,))
    rules["top_k"] = dataclasses.replace(rules["top_k"], high=model.card)
    rules["duration"] = dataclasses.replace(rules["duration"], low=model.min_duration, above=False)
    low, high = context_range(model)
    rules["context"] = dataclasses.replace(rules["context"], low=low, high=high, above=False)
    rules["hybrid_prefix"] = dataclasses.replace(rules["hybrid_prefix"], high=0.0)
    return rules


def check_prompts(prompts: Any) -> tuple[str | None, ...]:
    """str, or a list of str / None (unconditional) -> a tuple; empty lists and empty texts refused."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise SettingTypeError(f"<prompts> must be a text or a list of texts, got {type(prompts).__name__}")
    if not prompts:
        raise SettingError("no prompt given: pass at least one text in <prompts>, or <unconditional>")
    for i, p in enumerate(prompts):
        where = f"<prompts> {i + 1} of {len(prompts)}"
        if p is not None and not isinstance(p, str):
            raise SettingTypeError(f"{where} must be a text, got {type(p).__name__}")
        if p is not None and not re.search(PROMPT_PATTERN, p):
            raise SettingError(f"{where} is empty; write what to generate, or use <unconditional> for a sample "
                               "without text")
    return tuple(prompts)


def check_levers(gen: GenerationConfig, explicit: Collection[str], *, has_rescorer: bool,
                 has_ar_model: bool) -> None:
    """The quality levers' rules: each setting needs its AR model and each AR model its setting. `explicit`: the
    GenerationConfig fields the caller set. Cheap: the CLI runs it on its flags before loading any model."""
    if not has_rescorer and "rescore_weight" in explicit:
        raise SettingError("<rescore_weight> needs <rescorer>: it weighs that model's probabilities (an "
                           "autoregressive MusicGen model), and is used only with a rescorer")
    if not has_rescorer and not has_ar_model and "ar_cfg" in explicit:
        raise SettingError("<ar_cfg> is the guidance of a rescorer or hybrid AR model: also pass <rescorer> or "
                           "<ar_model>")
    if gen.hybrid_prefix > 0 and not has_ar_model:
        raise SettingError("<hybrid_prefix> needs <ar_model>, the AR model that writes the prefix (an "
                           "autoregressive MusicGen model)")
    if has_ar_model and not gen.hybrid_prefix > 0:
        raise SettingError("<ar_model> is used only by the hybrid: also pass <hybrid_prefix> (seconds)")


def companion_of(other: Any, role: str, model: ModelConfig, sample_rate: int, device: torch.device) -> ARCompanion:
    """The AR model of a lever (role "rescorer" or "ar_model"), checked against the MAGNeT model it serves."""
    from .musicgen import ARCompanion

    what = "rescorer" if role == "rescorer" else "hybrid AR model"
    comp = other if isinstance(other, ARCompanion) else getattr(other, "companion", lambda: None)()
    if comp is None:
        raise SettingTypeError(f"<{role}> must be an Engine of a MusicGen model (magnet_engine.load), got "
                           f"{type(other).__name__}")
    if model.kind != "magnet":
        raise SettingError(f"a {what} works with a MAGNeT model, but the main model is {model.kind!r}; drop <{role}> "
                           "or load a MAGNeT checkpoint")
    a, b = model, comp.config
    for name in ("n_q", "card", "frame_rate"):
        if getattr(a, name) != getattr(b, name):
            raise SettingError(f"the {what} has {name}={getattr(b, name)} but the MAGNeT model has "
                               f"{name}={getattr(a, name)}: both must share one codec's tokens; pass to <{role}> a "
                               "model trained on the same EnCodec")
    if comp.sample_rate != sample_rate:
        raise SettingError(f"the {what}'s codec runs at {comp.sample_rate} Hz but the MAGNeT model's at "
                           f"{sample_rate} Hz: both must share one codec (<{role}>)")
    if comp.device.type != device.type or (comp.device.index or 0) != (device.index or 0):
        raise SettingError(f"the {what} is on {comp.device} but the MAGNeT model on {device}; load <{role}> on the "
                           "same device")
    return comp


def check_prompt_codes(codes: Any, audio: Any, batch: int, model: ModelConfig, frames: int
                       ) -> torch.Tensor | None:
    """[1 or B, K, P] integer tokens in [0, V), P < T' -> [B, K, P] int64 (one item serves every prompt)."""
    import torch

    if codes is not None and audio is not None:
        raise SettingError("give <prompt_codes> or <prompt_audio>, not both")
    if codes is None:
        return None
    if not isinstance(codes, torch.Tensor):
        raise SettingTypeError(f"<prompt_codes> must be a tensor [B, K, P] of int64 tokens, got {type(codes).__name__}")
    if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise SettingTypeError(f"<prompt_codes> must hold integers (int64 tokens), got {codes.dtype}")
    k, card = model.n_q, model.card
    if codes.dim() != 3 or codes.shape[1] != k:
        raise SettingError(f"<prompt_codes> must be [B, {k}, P] (the model has {k} codebooks), got "
                           f"{list(codes.shape)}")
    if codes.shape[0] not in (1, batch):
        raise SettingError(f"<prompt_codes> hold {codes.shape[0]} items for {batch} prompts; give one or {batch}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= card):
        raise SettingError(f"<prompt_codes> must lie in [0, {card}), got values in [{int(codes.min())}, "
                           f"{int(codes.max())}]")
    if codes.shape[-1] >= frames:
        raise SettingError(f"the prompt in <prompt_codes> ({codes.shape[-1]} frames) must be shorter than the "
                           f"generation ({frames} frames); raise <duration>")
    return codes.long().expand(batch, -1, -1)


def check_prompt_audio(audio: Any, batch: int, model: ModelConfig, sample_rate: int, frames: int
                       ) -> torch.Tensor | None:
    """[1 or B, 1, samples] finite float audio at the codec's rate, shorter than the generation -> [B, 1, samples]."""
    import torch

    if audio is None:
        return None
    if not isinstance(audio, torch.Tensor) or not audio.is_floating_point():
        raise SettingTypeError(f"<prompt_audio> must be a float tensor [B, 1, samples] at {sample_rate} Hz, got "
                           f"{getattr(audio, 'dtype', type(audio).__name__)}")
    if audio.dim() != 3 or audio.shape[1] != 1:
        raise SettingError(f"<prompt_audio> must be [B, 1, samples] mono, got {list(audio.shape)}")
    if audio.shape[0] not in (1, batch):
        raise SettingError(f"<prompt_audio> holds {audio.shape[0]} items for {batch} prompts; give one or {batch}")
    if not bool(torch.isfinite(audio).all()):
        raise SettingError("<prompt_audio> holds NaN or infinite samples")
    prompt_frames = math.ceil(audio.shape[-1] * model.frame_rate / sample_rate)
    if prompt_frames >= frames:
        raise SettingError(f"the audio prompt in <prompt_audio> ({audio.shape[-1] / sample_rate:g}s) must be "
                           f"shorter than the generation ({frames / model.frame_rate:g}s); raise <duration>")
    return audio.float().expand(batch, -1, -1)
