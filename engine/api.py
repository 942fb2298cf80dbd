"""The Python API: `engine.load(...)` -> `Engine`, whose `generate(prompts, ...)` goes text -> tokens -> audio."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import magnet
from .config import GenerationConfig, ModelConfig, default_generation
from .loading import parse_xp_cfg, read_package, resolve_files
from .model import LM
from .sampling import sample_ref
from .text import TextConditioner, load_text_encoder

TEXT_PROJ_KEY = "condition_provider.conditioners.description.output_proj."


@dataclass
class Generation:
    audio: torch.Tensor  # [B, 1, samples] fp32
    codes: torch.Tensor  # [B, K, T] int64
    sample_rate: int


class Engine:
    """A loaded model: LM + text conditioner + codec on one device. Backends swap `sample` and the LM's attention
    (see `kernels.apply`) or `step` (onnxruntime); the decoding loop stays the same."""

    def __init__(self, lm: LM, text: TextConditioner, codec: torch.nn.Module, device: torch.device) -> None:
        self.lm, self.text, self.codec, self.device = lm, text, codec, device
        self.config: ModelConfig = lm.cfg
        self.sample: magnet.Sampler = sample_ref
        self.make_step: Callable[[torch.Tensor], magnet.Step] = self._torch_step

    @property
    def sample_rate(self) -> int:
        return int(self.codec.config.sample_rate)

    def default_generation(self) -> GenerationConfig:
        return default_generation(self.config)

    def _torch_step(self, cond: torch.Tensor) -> magnet.Step:
        """Text embeddings [B, L, dim] -> a step function with the cross-attention k/v computed once."""
        cross = self.lm.cross_kv(cond)

        def step(codes: torch.Tensor, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.lm(torch.cat([codes, codes]), stage, cross)  # [2B, T, V]: [cond; uncond]
            return logits.chunk(2)

        return step

    def settings(self, config: GenerationConfig | None = None, **overrides: Any) -> GenerationConfig:
        """The model's defaults, then `config`, then keyword overrides (GenerationConfig field names)."""
        base = config if config is not None else self.default_generation()
        gen = dataclasses.replace(base, **overrides) if overrides else base
        gen.check_for(self.config)
        return gen

    @torch.no_grad()
    def generate(self, prompts: Sequence[str | None], config: GenerationConfig | None = None, *,
                 prompt_codes: torch.Tensor | None = None, prompt_audio: torch.Tensor | None = None,
                 progress: magnet.Progress | None = None, decode: bool = True, **overrides: Any) -> Generation:
        """prompts: B texts (None = unconditional). prompt_codes [B, K, P] int64 or prompt_audio [B, 1, samples]
        at the codec's rate continue that audio. Settings: GenerationConfig fields as keywords."""
        gen = self.settings(config, **overrides)
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise ValueError("no prompt given: pass at least one text (or None for an unconditional sample)")
        prompt = self._prompt_codes(len(prompts), prompt_codes, prompt_audio)
        generator = None
        if gen.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(gen.seed)
        cond = self.text(list(prompts))
        if self.config.kind != "magnet":
            raise ValueError(f"generation for {self.config.kind} models is not available in this build")
        step = self.make_step(cond)
        codes = magnet.generate_tokens(step, self.sample, self.config, gen, len(prompts), self.device, prompt,
                                       generator, progress)
        audio = self.decode(codes) if decode else torch.empty(len(prompts), 1, 0)
        return Generation(audio=audio, codes=codes, sample_rate=self.sample_rate)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T] -> audio [B, 1, T·hop] fp32."""
        return self.codec.decode(codes.to(self.device)).float()

    @torch.no_grad()
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [B, 1, samples] at the codec's rate -> codes [B, K, T]."""
        return self.codec.encode(audio.to(self.device, torch.float32))

    def _prompt_codes(self, batch: int, codes: torch.Tensor | None, audio: torch.Tensor | None
                      ) -> torch.Tensor | None:
        if codes is not None and audio is not None:
            raise ValueError("give prompt_codes or prompt_audio, not both")
        if audio is not None:
            if audio.dim() != 3 or audio.shape[1] != 1:
                raise ValueError(f"prompt audio must be [B, 1, samples] mono, got {list(audio.shape)}")
            codes = self.encode(audio)
        if codes is None:
            return None
        if codes.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"prompt codes must be integers (int64), got {codes.dtype}")
        k, card = self.config.n_q, self.config.card
        if codes.dim() != 3 or codes.shape[1] != k:
            raise ValueError(f"prompt codes must be [B, {k}, P], got {list(codes.shape)}")
        if codes.shape[0] == 1 and batch > 1:
            codes = codes.expand(batch, -1, -1)
        if codes.shape[0] != batch:
            raise ValueError(f"prompt codes hold {codes.shape[0]} items for {batch} prompts; give one or {batch}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= card):
            raise ValueError(f"prompt codes must lie in [0, {card}), got values in [{int(codes.min())}, "
                             f"{int(codes.max())}]")
        return codes.to(self.device, torch.long)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:  # the reference runs its transformer layers in fp16 on CUDA, fp32 on CPU
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {sorted(table)}")
    return table[dtype]


def load(model: str | Path | None = None, text_encoder: str | Path | None = None,
         device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> Engine:
    """Load a model: a folder with state_dict.bin + compression_state_dict.bin, an LM package file, or a Hugging
    Face id (facebook/magnet-small-10secs, ...). The text encoder is `text_encoder` if given, else a `t5/` folder
    beside the checkpoint, else the one the checkpoint names (t5-base / t5-large via the Hugging Face cache)."""
    from transformers.utils import logging as hf_logging

    from .codec import Encodec

    hf_logging.disable_progress_bar()
    if model is None:
        raise ValueError("no model given and no default model is shipped yet: pass --model DIR|ID "
                         "(e.g. facebook/magnet-small-10secs)")
    dev = torch.device(device) if device is not None else default_device()
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    dt = parse_dtype(dtype, dev)
    lm_path, codec_path = resolve_files(model)
    pkg = read_package(lm_path)
    state = pkg["best_state"]
    cfg = ModelConfig.from_xp_cfg(parse_xp_cfg(pkg, lm_path), state)
    lm = LM(cfg)
    state = {(("text_proj." + k[len(TEXT_PROJ_KEY):]) if k.startswith(TEXT_PROJ_KEY) else k): v.float()
             for k, v in state.items()}
    missing, unexpected = lm.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{lm_path} does not fit a {cfg.kind} model of its own config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    lm = lm.to(dev).to_dtype(dt).eval()
    codec = Encodec.from_package(read_package(codec_path)).to(dev).eval()
    if text_encoder is None:
        beside = lm_path.parent / "t5"
        text_encoder = beside if beside.is_dir() else cfg.text_encoder
    tokenizer, encoder = load_text_encoder(text_encoder, dev)
    return Engine(lm, TextConditioner(tokenizer, encoder, lm.text_proj), codec, dev)
