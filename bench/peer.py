"""The external peer: Hugging Face transformers' `MusicgenForConditionalGeneration` at the same sizes as our presets
(random weights from a `MusicgenConfig`, nothing downloaded). It is what a user would pick instead of this engine:
`model.generate(**inputs, guidance_scale=3, max_new_tokens=N, do_sample=True)`, eager attention as shipped.

Stages are timed inside the one `generate` call by wrapping the text encoder's forward and the audio codec's decode
(device synced at their boundaries); the LM stage is the rest.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from .common import StageClock, sync
from .timing import make_row, print_row, prompts_for, time_requests

GUIDANCE = 3.0  # MusicGen's default classifier-free guidance
FRAME_RATE = 50  # EnCodec 32 kHz: 640-sample hop


def musicgen_config(preset: Any) -> Any:
    """A transformers `MusicgenConfig` with the preset's LM, text-encoder and codec shapes."""
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, T5Config

    c = preset.codec
    text = T5Config(**preset.text, dropout_rate=0.0, feed_forward_proj="relu", use_cache=False)
    audio = EncodecConfig(
        sampling_rate=c["sample_rate"], audio_channels=c["channels"], num_filters=c["n_filters"],
        upsampling_ratios=list(c["ratios"]), codebook_size=c["bins"], codebook_dim=c["dimension"],
        hidden_size=c["dimension"], num_lstm_layers=c["lstm_layers"], compress=c["compress"],
        residual_kernel_size=c["residual_kernel_size"], num_residual_layers=c["n_residual_layers"],
        kernel_size=c["kernel_size"], last_kernel_size=c["last_kernel_size"], dilation_growth_rate=c["dilation_base"],
        norm_type="weight_norm", use_causal_conv=False, pad_mode="constant", use_conv_shortcut=False,
        normalize=False, target_bandwidths=[2.2], trim_right_ratio=1.0)
    decoder = MusicgenDecoderConfig(
        vocab_size=c["bins"], num_codebooks=c["n_q"], hidden_size=preset.dim, num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads, ffn_dim=4 * preset.dim, max_position_embeddings=4096, dropout=0.0,
        activation_function="gelu", pad_token_id=c["bins"], bos_token_id=c["bins"])
    return MusicgenConfig(text_encoder=text, audio_encoder=audio, decoder=decoder)


def build_peer(preset: Any, device: torch.device, dtype: torch.dtype, seed: int = 0) -> tuple[Any, float]:
    """-> (model in eval mode on `device`, LM parameters in millions). transformers' own init (N(0, 0.02))."""
    from transformers import MusicgenForConditionalGeneration
    from transformers.utils import logging as hf_logging

    # the released MusicGen configs put pad/bos at id 2048 (= vocab size) too; transformers warns about it
    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = MusicgenForConditionalGeneration(musicgen_config(preset))
    model.decoder.to(dtype)  # the LM in the asked dtype; text encoder and codec stay fp32, as in our engine
    proj = getattr(model, "enc_to_dec_proj", None)  # only when the text width differs from the LM's
    if proj is not None:
        proj.to(dtype)  # counted with the LM below: it maps the text states into the decoder's width
    # The fp32 encoder's states meet `dtype` weights next (the projection, else cross-attention): without this cast a
    # half LM fails with "expected mat1 and mat2 to have the same dtype, float != c10::Half"
    model.text_encoder.register_forward_hook(_states_to(dtype))
    params = sum(p.numel() for p in model.decoder.parameters())
    params += 0 if proj is None else sum(p.numel() for p in proj.parameters())
    return model.to(device).eval(), round(params / 1e6, 2)


def _states_to(dtype: torch.dtype) -> Callable[..., Any]:
    """A forward hook: the text encoder's `last_hidden_state` [B, L, text dim] cast to `dtype`."""
    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        output.last_hidden_state = output.last_hidden_state.to(dtype)
        return output

    return hook


def _timed(clock: StageClock, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with clock(stage):
            return fn(*args, **kwargs)

    return wrapper


def peer_request(model: Any, tokenizer: Any, prompts: list[str], frames: int, do_sample: bool, seed: int,
                 device: torch.device) -> Callable[[StageClock], int]:
    """One `generate` call timed per stage. max_new_tokens = frames + K - 1: the delay pattern costs K - 1 steps."""
    k = model.decoder.config.num_codebooks
    hop = model.audio_encoder.config.hop_length if hasattr(model.audio_encoder.config, "hop_length") else 640

    def run_once(clock: StageClock) -> int:
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)
        inputs = {k_: v.to(device) for k_, v in inputs.items() if k_ in ("input_ids", "attention_mask")}
        enc, codec = model.text_encoder, model.audio_encoder
        enc.forward = _timed(clock, "text", enc.forward)  # instance attributes shadow the methods for one call
        codec.decode = _timed(clock, "codec", codec.decode)
        torch.manual_seed(seed)
        try:
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                audio = model.generate(**inputs, guidance_scale=GUIDANCE, max_new_tokens=frames + k - 1,
                                       do_sample=do_sample)  # [B, 1, samples]
            sync(device)
            total = time.perf_counter() - t0
        finally:
            del enc.forward, codec.decode
        clock.seconds["lm"] = total - clock.seconds.get("text", 0.0) - clock.seconds.get("codec", 0.0)
        return int(audio.shape[-1]) // hop

    return run_once


def run_peer(s: Any) -> list[dict[str, Any]]:
    """`--kind hf-musicgen`: one row per batch size, same schema as the engine's rows."""
    from .presets import default_tokenizer, get_preset

    preset = get_preset(s.model)
    if s.steps is not None:
        raise ValueError("--steps applies to MAGNeT only; hf-musicgen takes one step per frame")
    if s.sets:
        raise ValueError("--set applies to our engine's kinds (magnet, ar); hf-musicgen keeps transformers' settings")
    segment = 30.0 if preset.kind != "magnet" else preset.segment
    if s.duration > segment:
        raise ValueError(f"--duration {s.duration} exceeds the {segment}s segment of {preset.name}")
    model, params = build_peer(preset, s.device, s.dtype, s.seed)
    tokenizer, tok_name = default_tokenizer()
    frames = int(round(s.duration * FRAME_RATE))
    k = model.decoder.config.num_codebooks
    rows = []
    for batch in s.batches:
        run_once = peer_request(model, tokenizer, prompts_for(batch), frames, not s.greedy, s.seed, s.device)
        timed = time_requests(run_once, s.device, s.repeats, s.warmup, lambda got: ([got + k - 1], got + k - 1))
        rows.append(make_row(
            s, model=preset.name, kind="hf-musicgen", backend="hf", batch=batch, timed=timed,
            frame_rate=FRAME_RATE, params_m=params, weights="random",
            text_encoder=f"random {preset.text_name} ({preset.text['d_model']}-d) + {tok_name}",
            notes=f"transformers MusicgenForConditionalGeneration, guidance_scale={GUIDANCE}, "
                  f"do_sample={not s.greedy}, eager attention; text encoder speed barely matters"))
        print_row(rows[-1])
    return rows
