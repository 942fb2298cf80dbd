"""Benchmark models: random weights in the released shapes (speed does not depend on trained weights), or a local
checkpoint through `magnet_engine.load`.

Shapes (magnet-spec §1.1, §4): small 1024 dim / 16 heads / 24 layers, medium 1536 / 24 / 48, FFN 4×dim, card 2048,
K = 4 codebooks, T5-base text encoder (768-d), EnCodec 32 kHz (ratios 8,5,4,4, 64 filters, 128-d latent, 2-layer
LSTM, 4 × 2048 RVQ). MusicGen small/medium share the LM shapes, with a causal pass and delays (0, 1, 2, 3).

Random weights are initialised like a trained model (N(0, 0.02) matrices, unit LayerNorms) rather than with
PyTorch's defaults, so fp16 activations stay finite and sampling never sees NaN/inf.

The text encoder of a random preset is a random `T5EncoderModel` of the named width, and the tokenizer is the
fixture's (`../shared/fixtures/magnet-tiny/t5`) when present, else `WordTokenizer`: nothing is downloaded. Text is
encoded once per prompt per request, so its weights and tokenizer barely change the measured latency.
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from magnet_engine.engine.api import Engine
from magnet_engine.engine.config import ModelConfig
from magnet_engine.engine.loading import SHIPPED
from magnet_engine.engine.model import LM
from magnet_engine.engine.text import TextConditioner
from torch import nn

from .common import REPO

FIXTURE_TOKENIZER = REPO.parent / "shared" / "fixtures" / "magnet-tiny" / "t5"
INIT_STD = 0.02  # GPT-style init: keeps a 48-layer fp16 residual stream far from overflow
KINDS = ("magnet", "ar")  # engine kinds; "hf-musicgen" is the external peer (bench.peer)

T5_BASE = {"vocab_size": 32128, "d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12, "num_heads": 12}
T5_TINY = {"vocab_size": 32128, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4}

CODEC_32KHZ: dict[str, Any] = {
    "sample_rate": 32000, "channels": 1, "dimension": 128, "n_filters": 64, "ratios": (8, 5, 4, 4),
    "n_residual_layers": 1, "kernel_size": 7, "last_kernel_size": 7, "residual_kernel_size": 3, "dilation_base": 2,
    "compress": 2, "lstm_layers": 2, "n_q": 4, "bins": 2048, "norm": "weight_norm", "pad_mode": "constant",
}
# The fixture's codec: same hop (640 samples at 32 kHz, 50 Hz) and codebooks, 16× fewer filters.
CODEC_TINY: dict[str, Any] = {**CODEC_32KHZ, "dimension": 16, "n_filters": 4}


@dataclass(frozen=True)
class Preset:
    """A model shape. `kind` None = either kind (tiny); `segment` is the longest generation in seconds."""

    name: str
    kind: str | None
    dim: int
    num_heads: int
    num_layers: int
    text: dict[str, int] = field(default_factory=lambda: dict(T5_BASE))
    codec: dict[str, Any] = field(default_factory=lambda: dict(CODEC_32KHZ))
    segment: float = 10.0
    text_name: str = "t5-base"

    def model_config(self, kind: str) -> ModelConfig:
        """The engine's ModelConfig for `kind` ('magnet' or 'ar')."""
        common = dict(dim=self.dim, num_heads=self.num_heads, num_layers=self.num_layers, ffn_dim=4 * self.dim,
                      card=2048, n_q=4, text_dim=self.text["d_model"], text_encoder=self.text_name, frame_rate=50,
                      segment_duration=self.segment)
        if kind == "magnet":
            return ModelConfig(kind="magnet", subcodes_context=5, span_len=3, **common)
        if kind == "ar":
            return ModelConfig(kind="musicgen", subcodes_context=-1, span_len=1, delays=(0, 1, 2, 3), **common)
        raise ValueError(f"unknown kind {kind!r}: choose magnet or ar")


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("magnet-small-10secs", "magnet", 1024, 16, 24),
    Preset("magnet-medium-10secs", "magnet", 1536, 24, 48),
    Preset("musicgen-small", "ar", 1024, 16, 24, segment=30.0),
    Preset("musicgen-medium", "ar", 1536, 24, 48, segment=30.0),
    Preset("tiny", None, 64, 4, 2, text=dict(T5_TINY), codec=dict(CODEC_TINY), text_name="t5-tiny-random"),
)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)} or give a checkpoint path")
    return PRESETS[name]


def resolve_kind(preset: Preset, kind: str | None) -> str:
    """The kind a preset runs as: the preset's own, or --kind for kind-free presets (tiny); a clash is an error."""
    if kind is None:
        if preset.kind is None:
            raise ValueError(f"preset {preset.name} serves both kinds: pass --kind magnet|ar")
        return preset.kind
    if preset.kind is not None and kind != preset.kind:
        raise ValueError(f"preset {preset.name} is a {preset.kind} model, not {kind}; pick a {kind} preset")
    return kind


class WordTokenizer:
    """A network-free stand-in for the T5 tokenizer: one id per whitespace word (crc32 into the vocabulary) plus
    EOS (id 1), about T5's token count for English prompts. `tok(texts, return_tensors="pt", padding=True)`
    -> {"input_ids", "attention_mask"} [B, L] int64, padded with id 0."""

    pad_token_id, eos_token_id = 0, 1

    def __init__(self, vocab_size: int = 32128) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [2 + zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in text.lower().split()] + [1]

    def __call__(self, texts: str | Sequence[str], return_tensors: str = "pt", padding: bool = True,
                 **_: Any) -> dict[str, torch.Tensor]:
        ids = [self.encode(t) for t in ([texts] if isinstance(texts, str) else texts)]
        length = max(len(i) for i in ids)
        if not padding and any(len(i) != length for i in ids):
            raise ValueError("prompts of different lengths need padding=True")
        input_ids = torch.tensor([i + [0] * (length - len(i)) for i in ids], dtype=torch.long)
        mask = torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i in ids], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": mask}


def default_tokenizer() -> tuple[Any, str]:
    """-> (tokenizer, description): the fixture's T5 tokenizer when present (no network), else WordTokenizer."""
    if (FIXTURE_TOKENIZER / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(FIXTURE_TOKENIZER), local_files_only=True), "fixture-t5-tokenizer"
    return WordTokenizer(), "word-tokenizer"


def random_t5(text: dict[str, int], device: torch.device) -> nn.Module:
    """A random `T5EncoderModel` of the given dims (transformers' own init; fp32 as the reference runs it)."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(**text, dropout_rate=0.0, feed_forward_proj="relu", is_encoder_decoder=False, use_cache=False)
    return T5EncoderModel(cfg).to(device).eval()


@torch.no_grad()
def init_like_trained_(module: nn.Module, std: float = INIT_STD, seed: int = 0) -> nn.Module:
    """In place: matrices and embeddings N(0, std), LayerNorm weights 1, biases 0 (deterministic per seed)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            # draw on the host with a fixed generator so any device gets the same weights
            p.copy_(torch.randn(p.shape, generator=gen).mul_(std))
        elif name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()
    return module


def random_lm(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LM:
    """LM of `cfg` with trained-like random weights. Built on the meta device first so the 0.4-1.8 B parameters
    are initialised once (not by nn.Linear's kaiming init and then again)."""
    with torch.device("meta"):
        lm = LM(cfg)
    lm = lm.to_empty(device=device)
    init_like_trained_(lm, seed=seed)
    return lm.to_dtype(dtype).eval()


def random_codec(codec: dict[str, Any], device: torch.device, seed: int = 0) -> nn.Module:
    """EnCodec of the given config with PyTorch's default init and N(0, 1) codewords (decode cost is shape-only)."""
    from magnet_engine.engine.codec import CodecConfig, Encodec

    torch.manual_seed(seed)
    model = Encodec(CodecConfig(**codec))
    with torch.no_grad():
        model.quantizer.embed.normal_()
    return model.to(device).eval()


@dataclass
class Built:
    """An engine plus what the row reports about it."""

    engine: Engine
    model: str
    kind: str  # magnet | ar
    weights: str  # random | checkpoint
    text_encoder: str
    params_m: float


def build(model: str, kind: str | None, device: torch.device, dtype: str | None, seed: int = 0,
          backend: str | None = None) -> Built:
    """A preset name -> random-weight engine on `backend` (its `adapt`); anything else -> `magnet_engine.load(model,
    backend)` (the shipped models, a local checkpoint or ONNX export folder). `dtype`: as the user gave it (None =
    the device's default, or the export's)."""
    from magnet_engine.engine import backends
    from magnet_engine.engine.api import parse_dtype
    from magnet_engine.engine.backends import load

    if model in PRESETS:
        preset = PRESETS[model]
        kind = resolve_kind(preset, kind)
        cfg = preset.model_config(kind)
        lm = random_lm(cfg, device, parse_dtype(dtype, device), seed)
        tokenizer, tok_name = default_tokenizer()
        encoder = random_t5(preset.text, device)
        text = TextConditioner(tokenizer, encoder, lm.text_proj)
        codec = random_codec(preset.codec, device, seed)
        engine = backends.get(backend or backends.BUILTIN).adapt(Engine(cfg, text, codec, device, lm=lm))
        text_desc = f"random {preset.text_name} ({preset.text['d_model']}-d) + {tok_name}"
        return Built(engine, model, kind, "random", text_desc, lm_params_m(lm))
    if not Path(model).exists() and model not in SHIPPED:
        raise ValueError(f"{model!r} is neither a preset ({', '.join(PRESETS)}), nor a shipped model "
                         f"({', '.join(SHIPPED)}), nor a local checkpoint path")
    engine = load(model, backend=backend, device=str(device), dtype=dtype)
    got = "magnet" if engine.config.kind == "magnet" else "ar"
    if kind is not None and kind != got:
        raise ValueError(f"{model} holds a {got} model, not {kind}")
    params = lm_params_m(engine.lm) if engine.lm is not None else None
    return Built(engine, model, got, "checkpoint", engine.config.text_encoder, params or 0.0)


def lm_params_m(lm: nn.Module | None) -> float:
    return 0.0 if lm is None else round(sum(p.numel() for p in lm.parameters()) / 1e6, 2)
