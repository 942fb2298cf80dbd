"""Settings as frozen dataclasses: one source of truth per default. The CLI is built from these fields."""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

SPAN_ARRANGEMENTS = ("nonoverlap", "stride1")
SPAN_SCORINGS = ("max", "prod")
# The paper's rescoring weight could not be retrieved (only its abstract and summaries were readable); 0.5 mixes
# MAGNeT's and the AR model's probabilities equally. See engine.rescore.
DEFAULT_RESCORE_WEIGHT = 0.5


@dataclass(frozen=True)
class ModelConfig:
    """The language model's shape, read from a checkpoint's `xp.cfg` (audiocraft) or `config.json` (ours)."""

    kind: Literal["magnet", "musicgen"]
    dim: int
    num_heads: int
    num_layers: int
    ffn_dim: int
    card: int  # V: vocabulary per codebook; token `card` is MAGNeT's mask token
    n_q: int  # K: codebooks
    text_dim: int  # width of the text encoder's states, input of `output_proj`
    text_encoder: str  # e.g. "t5-base"; a Hugging Face id or a local folder
    frame_rate: int = 50
    segment_duration: float = 10.0  # seconds; generation is at most this long
    subcodes_context: int = 5  # band half-width W for codebooks >= 1 (MAGNeT); -1 = unrestricted
    span_len: int = 3  # MAGNeT masking span
    delays: tuple[int, ...] = ()  # MusicGen delay pattern, one per codebook

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}; fix the model config")
        if self.kind not in ("magnet", "musicgen"):
            raise ValueError(f"unknown model kind {self.kind!r}: expected 'magnet' or 'musicgen'")
        if self.kind == "musicgen" and len(self.delays) != self.n_q:
            raise ValueError(f"a musicgen config needs {self.n_q} delays, got {self.delays}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def max_frames(self) -> int:
        return int(round(self.segment_duration * self.frame_rate))

    @property
    def min_frames(self) -> int:
        """The shortest generation: one span for MAGNeT (its nonoverlap output is a whole number of spans, and
        stride1 masks a span at a time), one frame for MusicGen."""
        return self.span_len if self.kind == "magnet" else 1

    @property
    def min_duration(self) -> float:
        """`min_frames` in seconds: the lowest `duration` (check_for)."""
        return self.min_frames / self.frame_rate

    def window(self, stage: int) -> int | None:
        """Self-attention band for a codebook stage: None = full (stage 0, or unrestricted models)."""
        if self.kind != "magnet" or stage == 0 or self.subcodes_context < 0:
            return None
        return self.subcodes_context

    @classmethod
    def from_xp_cfg(cls, cfg: dict[str, Any], state: dict[str, Any] | None = None) -> ModelConfig:
        """Read the LM settings from an audiocraft training config (the `xp.cfg` YAML, already parsed)."""
        try:
            lm_model = cfg["lm_model"]
            tlm = cfg["transformer_lm"]
            cond = cfg["conditioners"]["description"]
            pattern = cfg["codebooks_pattern"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"xp.cfg lacks {e}: this is not an audiocraft MAGNeT/MusicGen LM checkpoint") from e
        if lm_model == "transformer_lm_magnet":
            kind = "magnet"
        elif lm_model == "transformer_lm":
            kind = "musicgen"
        else:
            raise ValueError(f"unsupported lm_model {lm_model!r}: expected transformer_lm_magnet or transformer_lm")
        if cond.get("model") != "t5":
            raise ValueError(f"unsupported text conditioner {cond.get('model')!r}: only T5 descriptions are supported")
        for key, want in (("norm_first", True), ("bias_ff", False), ("bias_attn", False), ("activation", "gelu"),
                          ("positional_embedding", "sin"), ("norm", "layer_norm"), ("layer_scale", None)):
            if tlm.get(key, want) != want:
                raise ValueError(f"unsupported transformer_lm.{key}={tlm.get(key)!r} (this engine needs {want!r})")
        if tlm.get("causal", kind == "musicgen") != (kind == "musicgen"):
            raise ValueError(f"transformer_lm.causal={tlm.get('causal')} does not fit a {kind} model")
        t5_name = cond["t5"]["name"]
        dim = int(tlm["dim"])
        delays: tuple[int, ...] = ()
        if kind == "musicgen":
            if pattern.get("modeling") != "delay":
                raise ValueError(f"unsupported MusicGen codebooks_pattern {pattern.get('modeling')!r}: need 'delay'")
            delays = tuple(int(d) for d in pattern["delay"]["delays"])
        text_dim = _T5_WIDTHS.get(t5_name.split("/")[-1])
        if state is not None:  # the projection's shape is the ground truth
            w = state.get("condition_provider.conditioners.description.output_proj.weight")
            if w is not None:
                text_dim = int(w.shape[1])
        if text_dim is None:
            raise ValueError(f"cannot tell the width of text encoder {t5_name!r}")
        frame_rate = int(tlm.get("compression_model_framerate", 50))
        segment = float(tlm.get("segment_duration", cfg.get("dataset", {}).get("segment_duration", 10)))
        return cls(kind=kind, dim=dim, num_heads=int(tlm["num_heads"]), num_layers=int(tlm["num_layers"]),
                   ffn_dim=int(tlm.get("hidden_scale", 4) * dim), card=int(tlm["card"]), n_q=int(tlm["n_q"]),
                   text_dim=text_dim, text_encoder=t5_name, frame_rate=frame_rate, segment_duration=segment,
                   subcodes_context=int(tlm.get("subcodes_context", -1)),
                   span_len=int(tlm.get("span_len", cfg.get("masking", {}).get("span_len", 1))), delays=delays)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        d = dict(d)
        d["delays"] = tuple(d.get("delays", ()))
        return cls(**d)


_T5_WIDTHS = {"t5-small": 512, "t5-base": 768, "t5-large": 1024, "t5-3b": 1024, "t5-11b": 1024}


class SettingError(ValueError):
    """A bad setting. The message is written once with each setting's name as `<field>` (GenerationConfig field
    names, or request parts such as `<prompts>`); every front end spells the names its own way: `str(e)` gives the
    Python names, `e.spelled(flags)` the CLI's flags, the HTTP service its JSON keys. `field` is the first one named."""

    def __init__(self, template: str) -> None:
        self.template = template
        names = _NAME.findall(template)
        self.field: str | None = names[0] if names else None
        super().__init__(self.spelled(PYTHON_NAMES))

    def spelled(self, names: Mapping[str, str]) -> str:
        """The message with each `<field>` replaced by names[field] (the field name itself when absent)."""
        return _NAME.sub(lambda m: names.get(m[1], m[1]), self.template)


class SettingTypeError(SettingError, TypeError):
    """A setting of the wrong type (a text where a number goes, a float tensor where tokens go)."""


_NAME = re.compile(r"<([a-z][a-z_]*)>")
# Python's spelling where it is not the field name (engine.request names the unconditional condition so)
PYTHON_NAMES = {"unconditional": "None"}


def check_real(name: str, value: Any, *, low: float | None = None, high: float | None = None, above: bool = False,
               hint: str = "") -> float:
    """A finite number (int or float, not bool) within [low, high] (low excluded when `above`) -> float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SettingTypeError(f"<{name}> must be a number, got {value!r}{hint}")
    try:
        value = float(value)
    except OverflowError:  # an int past float's range (JSON carries any)
        value = math.inf if value > 0 else -math.inf
    if not math.isfinite(value):
        raise SettingError(f"<{name}> must be a finite number, got {value}{hint}")
    too_low = low is not None and (value <= low if above else value < low)
    if too_low or (high is not None and value > high):
        span = (f"in {'(' if above else '['}{low:g}, {high:g}]" if low is not None and high is not None
                else f"at most {high:g}" if high is not None else f"{'>' if above else '>='} {low:g}")
        raise SettingError(f"<{name}> must be {span}, got {value:g}{hint}")
    return value


def whole(value: float) -> bool:
    """A finite float without fraction (3.0)."""
    return math.isfinite(value) and float(value).is_integer()


def check_int(name: str, value: Any, *, low: int = 0, high: int | None = None, hint: str = "") -> int:
    """A whole number (an int, or a float without fraction: JSON's 3.0 is 3) in [low, high] -> int."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)) and whole(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SettingTypeError(f"<{name}> must be a whole number, got {value!r}{hint}")
    value = int(value)
    if value < low or (high is not None and value > high):
        span = f"in [{low}, {high}]" if high is not None else "positive" if low == 1 else f">= {low}"
        raise SettingError(f"<{name}> must be {span}, got {value}{hint}")
    return value


# Seeds in [0, 2**53 - 1]: within torch.Generator.manual_seed's range, exact in a JSON number for every client
# (a JavaScript Number, a double) and exactly stated as a JSON Schema maximum (validators compare as doubles).
MAX_SEED = 2**53 - 1
# Long pieces are planned window by window and their audio is held whole (an hour at 32 kHz: 460 MB of float32):
# a cap keeps a typo (or a hostile request) from planning millions of windows.
MAX_DURATION = 3600.0


@dataclass(frozen=True)
class Rule:
    """What one setting takes, written once: `check` refuses anything else (a SettingError naming it) and normalises
    (lists -> tuples, ints -> floats where a float is meant); the HTTP service builds its request schema from the
    same fields (serve.http), so the schema says exactly what `check` takes."""

    kind: Literal["int", "real", "bool", "choice", "list"]
    low: float | None = None  # int, real: the lowest value (an int's default: 0)
    high: float | None = None  # int, real: the highest value
    above: bool = False  # real: `low` itself excluded
    choices: tuple[str, ...] = ()  # choice
    item: Rule | None = None  # list: the rule of each value
    sizes: tuple[int, ...] | None = None  # list: the lengths it takes, consecutive (None: one or more)
    nullable: bool = False  # None allowed (the model's default)
    hint: str = ""  # appended to a refusal: what to write instead

    def check(self, name: str, value: Any) -> Any:
        if value is None and self.nullable:
            return None
        if self.kind == "int":
            return check_int(name, value, low=int(self.low or 0), high=None if self.high is None else int(self.high),
                             hint=self.hint)
        if self.kind == "real":
            return check_real(name, value, low=self.low, high=self.high, above=self.above, hint=self.hint)
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise SettingTypeError(f"<{name}> must be true or false, got {value!r}")
            return value
        if self.kind == "choice":
            if not isinstance(value, str) or value not in self.choices:
                raise SettingError(f"<{name}> must be one of {', '.join(self.choices)}; got {value!r}")
            return value
        assert self.kind == "list" and self.item is not None
        if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
            raise SettingTypeError(f"<{name}> must be a list of values, got {value!r}{self.hint}")
        if not value or (self.sizes is not None and len(value) not in self.sizes):
            want = "at least one value" if self.sizes is None else f"{' or '.join(map(str, self.sizes))} values"
            raise SettingError(f"<{name}> takes {want}, got {list(value)}{self.hint}")
        return tuple(self.item.check(name, v) for v in value)



# GenerationConfig field -> its rule: type, finiteness and range of one value. Cross-field and per-model rules are in
# __post_init__ / check_for (and `model_rules`, which tightens these for one model).
FIELD_RULES: dict[str, Rule] = {
    "steps": Rule("list", item=Rule("int", low=1), hint="; e.g. 20,10,10,10"),
    "greedy": Rule("bool"),
    "temperature": Rule("real", low=0.0),
    "anneal_temp": Rule("bool"),
    "top_k": Rule("int", hint="; use 0 to turn it off"),
    "top_p": Rule("real", low=0.0, high=1.0, hint="; use 0 to turn nucleus sampling off"),
    "cfg": Rule("list", item=Rule("real"), sizes=(1, 2), hint=" (one constant, or max,min annealed)"),
    "span_arrangement": Rule("choice", choices=SPAN_ARRANGEMENTS),
    "span_scoring": Rule("choice", choices=SPAN_SCORINGS),
    "duration": Rule("real", low=0.0, above=True, high=MAX_DURATION, nullable=True, hint=" seconds"),
    "seed": Rule("int", high=MAX_SEED, nullable=True),
    "rescore_weight": Rule("real", low=0.0, high=1.0,
                           hint=" (1 = MAGNeT's probabilities only, 0 = the rescorer's only)"),
    "ar_cfg": Rule("real", low=0.0, nullable=True, hint="; omit it for the model's default"),
    "hybrid_prefix": Rule("real", low=0.0, hint=" seconds (0 = off)"),
    "context": Rule("real", low=0.0, above=True, nullable=True, hint=" seconds; omit it for the model's default"),
}
GENERATION_FIELDS = frozenset(FIELD_RULES)  # the names GenerationConfig takes


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings. `None` fields take the model's default (`default_generation`), so a default is written once.

    MAGNeT: per-stage `steps`, mask schedule cos(π/2·τ), guidance annealed from cfg[0] to cfg[1] with the mask rate,
    temperature annealed linearly to 0 over each stage. MusicGen: constant guidance cfg[0], one step per frame.
    Every value is checked (type, finite, range) and normalised on construction: see `check_fields`.
    """

    steps: tuple[int, ...] = (20, 10, 10, 10)  # MAGNeT decoding steps per codebook stage
    greedy: bool = False  # argmax instead of sampling (deterministic)
    temperature: float = 3.0
    anneal_temp: bool = True
    top_k: int = 0
    top_p: float = 0.9
    cfg: tuple[float, ...] = (10.0, 1.0)  # (max, min) annealed, or (constant,)
    span_arrangement: str = "nonoverlap"
    span_scoring: str = "max"
    duration: float | None = None  # seconds; None = the model's segment; longer = windowed (engine.longform)
    seed: int | None = None
    # Quality levers of the paper (§3.3, engine.rescore / engine.hybrid); both need a second, autoregressive model.
    rescore_weight: float = DEFAULT_RESCORE_WEIGHT  # W in W·p_magnet + (1−W)·p_ar (span scores); used with a rescorer
    ar_cfg: float | None = None  # constant guidance of the rescorer / hybrid AR model; None = that model's default
    hybrid_prefix: float = 0.0  # seconds generated first by the AR model, then continued by MAGNeT; 0 = off
    # Long-form (duration past the segment, engine.longform): each window after the first continues from the last
    # `context` seconds of tokens. None = the model's default (DEFAULT_CONTEXT of the segment).
    context: float | None = None

    def __post_init__(self) -> None:
        for name, value in self.check_fields(dataclasses.asdict(self)).items():
            object.__setattr__(self, name, value)
        if self.duration is not None and self.hybrid_prefix >= self.duration:
            raise SettingError(f"<hybrid_prefix> ({self.hybrid_prefix}s) must be shorter than <duration> "
                               f"({self.duration}s); MAGNeT has to decode the rest")

    @staticmethod
    def check_fields(values: Mapping[str, Any]) -> dict[str, Any]:
        """Check and normalise some fields' values on their own (no model, no other field): unknown names, types,
        NaN and infinities, ranges. Cheap: the CLI runs it on its flags before loading anything."""
        unknown = sorted(set(values) - set(FIELD_RULES))
        if unknown:
            raise SettingError(f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; known: "
                               f"{', '.join(FIELD_RULES)}")
        return {name: FIELD_RULES[name].check(name, value) for name, value in values.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: GenerationConfig | None = None) -> GenerationConfig:
        """Fields from JSON (lists -> tuples) on top of `base` (default: the dataclass defaults)."""
        return dataclasses.replace(base if base is not None else cls(), **cls.check_fields(d))

    def overrides(self, base: GenerationConfig) -> dict[str, Any]:
        """The fields that differ from `base`, JSON-ready (tuples -> lists): `from_dict(x.overrides(b), b) == x`."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
                if v != getattr(base, k)}

    @property
    def cfg_max(self) -> float:
        return float(self.cfg[0])

    @property
    def cfg_min(self) -> float:
        return float(self.cfg[-1])

    @property
    def guided(self) -> bool:
        """False when guidance is 1 at every step: uncond + 1·(cond − uncond) is cond, so MAGNeT's loop skips the
        unconditional half of each LM pass (B rows instead of 2B)."""
        return not (self.cfg_max == 1.0 and self.cfg_min == 1.0)

    def check_for(self, model: ModelConfig) -> None:
        """Checks that need the model: step list length, top-k range, duration, long-form context."""
        if model.kind == "magnet" and len(self.steps) != model.n_q:
            raise SettingError(f"the model has {model.n_q} codebooks, so <steps> needs {model.n_q} values, "
                               f"got {len(self.steps)}")
        if self.top_k > model.card:
            raise SettingError(f"<top_k> must be in [0, {model.card}] (the vocabulary size), got {self.top_k}")
        if self.duration is not None and self.duration < model.min_duration:  # then frames(model) >= min_frames
            unit = "one frame" if model.min_frames == 1 else f"one span ({model.min_frames} frames)"
            raise SettingError(f"<duration> {self.duration:g}s is shorter than {unit}: at least "
                               f"{model.min_duration:g}s")
        if self.context is not None or is_long(model, self):  # the default context must fit this model too
            check_context(model, self)

    def frames(self, model: ModelConfig) -> int:
        """T = duration × frame rate (the model's segment when no duration is given); past the segment, the whole
        long-form piece (engine.longform)."""
        if self.duration is None:
            return model.max_frames
        return int(round(self.duration * model.frame_rate))


# Deterministic decoding (Engine.set_deterministic) is on by default on the device types where it costs at most 10%
# of a request: on CPU, +6-17% on the shipped model's 10 s request (median of 6 runs +8.4%; bench/RESULTS.md, "The
# 10 s request under 0.5 s"). On CUDA it is unmeasured (bench/gpu.sh measures it): opt-in there.
DETERMINISTIC_BY_DEFAULT = frozenset({"cpu"})


def deterministic_by_default(device_type: str) -> bool:
    """Whether an engine on this device type ("cpu", "cuda", ...) is deterministic unless told otherwise."""
    return device_type in DETERMINISTIC_BY_DEFAULT


def default_generation(model: ModelConfig) -> GenerationConfig:
    """The reference API's defaults for each model kind (audiocraft MAGNeT / MusicGen `set_generation_params`)."""
    if model.kind == "musicgen":
        return GenerationConfig(steps=(1,), temperature=1.0, anneal_temp=False, top_k=250, top_p=0.0, cfg=(3.0,))
    return GenerationConfig()


# ----------------------------------------------------------------- frame arithmetic of a request (no torch)

# Default context, as a fraction of the segment (bench/RESULTS.md, "Long-form"): half the segment carries the
# piece's material into each window while each window still adds half a segment of new audio.
DEFAULT_CONTEXT = 0.5


def output_frames(model: ModelConfig, gen: GenerationConfig) -> int:
    """Frames one segment's decoding returns: MAGNeT's nonoverlap trims T to a multiple of the span (498 for 10 s),
    as the reference does; the AR loop returns T."""
    t = gen.frames(model)
    return t - t % frame_multiple(model, gen)


def frame_multiple(model: ModelConfig, gen: GenerationConfig) -> int:
    """What a segment's output length is a multiple of: the span under MAGNeT's nonoverlap, else 1."""
    return model.span_len if model.kind == "magnet" and gen.span_arrangement == "nonoverlap" else 1


def is_long(model: ModelConfig, gen: GenerationConfig) -> bool:
    """True when the asked duration is past the model's segment: generated window by window."""
    return gen.duration is not None and gen.frames(model) > model.max_frames


def first_window(model: ModelConfig, gen: GenerationConfig) -> GenerationConfig:
    """The first (or only) segment's settings: for a long piece, the plain one-segment run (duration = segment)."""
    return dataclasses.replace(gen, duration=None) if is_long(model, gen) else gen


def context_range(model: ModelConfig) -> tuple[float, float]:
    """[lowest, highest] `context` in seconds: at least one frame, and at least one frame shorter than the window
    of either span arrangement (nonoverlap trims it to whole spans), so that each window adds new audio. Bounds in
    seconds, inclusive, so that a schema can state them exactly (engine.request.request_rules)."""
    w = min(output_frames(model, GenerationConfig(span_arrangement=a)) for a in SPAN_ARRANGEMENTS)
    return 1 / model.frame_rate, (w - 1) / model.frame_rate


def check_context(model: ModelConfig, gen: GenerationConfig) -> int:
    """-> C, the context in frames (`context_range`), in [1, W - 1] for the window's W frames."""
    seconds = model.segment_duration * DEFAULT_CONTEXT if gen.context is None else gen.context
    low, high = context_range(model)
    if seconds < low:
        raise SettingError(f"<context> {seconds:g}s is shorter than one frame (1/{model.frame_rate}s)")
    if seconds > high:
        raise SettingError(f"<context> {seconds:g}s must be shorter than the model's window of "
                           f"{high + low:g}s ({round((high + low) * model.frame_rate)} frames), so that each window "
                           f"adds new audio; e.g. {model.segment_duration * DEFAULT_CONTEXT:g}")
    return int(round(seconds * model.frame_rate))
