"""The manifest's "client" section: everything a client in another language needs to decode like the engine.

A client with onnxruntime, a tokenizer that reads `tokenizer/tokenizer.json`, and this section reproduces
`magnet.generate_tokens` without reading Python: the defaults, the mask id, the rows of `lm_step`, the text padding
rule, the span rules, continuation, the limits, and the mask schedule as stored numbers (float32 mask fractions and
the number of spans to re-mask for every span count), so that no client evaluates a cosine. The numbers come from
the engine's own `stage_schedule`; the rules below are `engine.magnet.generate_tokens` in words. Schema:
`export/manifest.schema.json`; clients that follow it: `tests/onnx_client.py`, `export/node/magnet.mjs`.

Sampling stays in the client, not in the graph: README, "ONNX: the export, driven from any language", says why.
"""
from __future__ import annotations

from typing import Any

from magnet_engine.engine.config import GenerationConfig, ModelConfig
from magnet_engine.engine.magnet import output_frames
from magnet_engine.engine.masking import DONT_REMASK, stage_schedule

MAX_TABLE_STEPS = 64  # mask fractions are listed for every step count 1..64; a client refuses more


def _defaults(gen: GenerationConfig, cfg: ModelConfig) -> dict[str, Any]:
    """Every decoding setting a MAGNeT client uses, stated (no 'None = the model's')."""
    return {"steps": list(gen.steps), "greedy": gen.greedy, "temperature": gen.temperature,
            "anneal_temp": gen.anneal_temp, "top_k": gen.top_k, "top_p": gen.top_p, "cfg": list(gen.cfg),
            "span_arrangement": gen.span_arrangement, "span_scoring": gen.span_scoring,
            "duration": gen.duration if gen.duration is not None else cfg.segment_duration,
            "frames": gen.frames(cfg), "output_frames": output_frames(cfg, gen), "seed": gen.seed}


def _stage_table(steps: int, gen: GenerationConfig, max_units: int) -> dict[str, Any]:
    plans = stage_schedule(steps, max_units, gen.cfg_max, gen.cfg_min, gen.temperature, gen.anneal_temp)
    # n_mask for every count of spans to generate: the float32 product mask_p * n_gen, truncated, at least 1
    n_mask = [[p.n_mask for p in stage_schedule(steps, n, gen.cfg_max, gen.cfg_min, gen.temperature,
                                                gen.anneal_temp)] for n in range(1, max_units + 1)]
    return {"steps": steps, "mask_p": [p.mask_p for p in plans], "cfg": [p.cfg_coef for p in plans],
            "temperature": [p.temperature for p in plans],
            "n_mask": [list(col) for col in zip(*n_mask)]}  # [step][n_gen - 1]


def client_contract(cfg: ModelConfig, gen: GenerationConfig, codec: dict[str, Any],
                    text_max_tokens: int | None) -> dict[str, Any]:
    """The "client" section for a model `cfg` whose defaults are `gen` (already the model's own)."""
    span, max_t = cfg.span_len, cfg.max_frames
    return {
        "mask_id": cfg.card,
        "codebooks": cfg.n_q,
        "vocab": cfg.card,
        "span_len": span,
        "frame_rate": cfg.frame_rate,
        "sample_rate": codec["sample_rate"],
        "hop_length": codec["hop_length"],
        "defaults": _defaults(gen, cfg),
        "limits": {
            "frames": [1, max_t],
            "duration_seconds": [1.0 / cfg.frame_rate, cfg.segment_duration],
            "stage": [0, cfg.n_q - 1],
            "steps_per_stage": [1, MAX_TABLE_STEPS],
            "top_k": [0, cfg.card],
            "top_p": [0.0, 1.0],
            "temperature_min": 0.0,
            "text_tokens_max": text_max_tokens,
            "lm_step_codes": [0, cfg.card],  # inclusive: the mask id is an input token
            "codec_codes": [0, cfg.card - 1],  # inclusive: finished tokens only
        },
        "frames_rule": "T = round(duration * frame_rate) (round half to even), 1 <= T <= limits.frames[1]; "
                       "nonoverlap with span_len > 1 trims T to T - T % span_len before decoding (output_frames)",
        "rows": {
            "guided": "lm_step codes = [codes; codes] (N = 2B): rows 0..B-1 attend to the text (cross_k/v have B "
                      "rows), rows B..2B-1 are unconditional (no text); logits rows split the same way",
            "unguided": "when the guidance is 1.0 at every step (cfg == [1.0] or [1.0, 1.0]) N = B: lm_step runs the "
                        "conditional rows only and cond = uncond = its logits",
        },
        "text": {
            "tokenizer": "tokenizer/tokenizer.json",
            "add_special_tokens": True,
            "padding": "none inside the tokenizer (tokenizer.json has padding and truncation off)",
            "rule": "encode each prompt alone: text_encoder(input_ids [1, l], attention_mask ones [1, l]) -> "
                    "[1, l, dim]; stack the prompts zero-padded to the longest l (L = max(1, max l)); a null "
                    "prompt (unconditional sample) is an all-zero row; padded positions are attended like any "
                    "other (no key mask), so L changes the result and must be the batch's longest",
        },
        "schedule": {
            "rule": "per stage s with S = steps[s] steps, step i: mask_p = mask_p_by_steps[S][i] (float32 "
                    "cos(pi/2 * i/(S-1)) as torch computes it; stored, never recompute); n_mask = max(1, "
                    "trunc(float32(mask_p * n_gen))) where n_gen = spans (nonoverlap) or frames (stride1) to "
                    "generate; cfg = mask_p * cfg_max + (1 - mask_p) * cfg_min (float64; cfg_max = cfg_min = cfg[0] "
                    "for one value); temperature = max(0.01, anneal_temp ? t * ((S - 1 - i) / S) : t) (float64)",
            "mask_p_by_steps": {str(s): [p.mask_p for p in stage_schedule(s, 1, 1.0, 1.0, 1.0, False)]
                                for s in range(1, MAX_TABLE_STEPS + 1)},
            "default": [_stage_table(s, gen, max_t) for s in gen.steps],
            "default_n_mask_index": "n_mask[i][n_gen - 1], n_gen from 1 to limits.frames[1]",
        },
        "decoding": {
            "order": "stages 0..K-1 one after another; codebook `stage` starts all mask_id; codebooks past the "
                     "stage stay mask_id while it is decoded",
            "step": "remask the chosen spans of row `stage` (set mask_id), re-write the prompt frames, run lm_step "
                    "(codes, stage) -> logits [N, T, V] of codebook `stage`, sample, write the sampled tokens at "
                    "the masked positions only, compute the span scores for the next step",
            "guidance": "logits = uncond + (cond - uncond) * cfg, float32, in this order",
            "probs": "softmax(logits / temperature) in float32; they score the spans",
            "greedy": "token = argmax(logits) (first index among equals); its probability from probs",
            "sampling": "one uniform u in [0, 1) per position; top_p > 0: keep tokens whose probability is >= the "
                        "threshold p* = the probability of the last token kept by the sorted exclusive cumsum "
                        "<= top_p (at least one); else top_k > 0: keep probs >= the k-th largest, renormalise (the "
                        "renormalised probability then scores the spans); pick the first index whose cumulative "
                        "weight exceeds u * total weight. Noise source differs per client: sampled runs agree in "
                        "distribution, greedy runs token for token",
        },
        "spans": {
            "dont_remask": DONT_REMASK,
            "nonoverlap": "chunks of span_len frames (T a multiple of span_len). Scores [B, T/span_len] start at 0 "
                          "for generated chunks and dont_remask for the prompt's (P // span_len chunks). Each step "
                          "re-masks the n_mask highest-scored chunks (top-k; ties do not arise in practice: fixed "
                          "chunks all hold dont_remask and are never among the top). After sampling: scoring max: "
                          "1 - max(prob over the chunk); prod: sum(-log prob over the chunk); chunks not re-masked "
                          "at this step get dont_remask",
            "stride1": "every window of span_len frames is a candidate. Scores [B, T]: -log prob where the step "
                       "sampled, dont_remask elsewhere (initially 0 for generated frames, dont_remask for the "
                       "prompt). Window score = sum of its span_len frame scores; rank windows by score, "
                       "descending. m = max(n_mask, span_len); lo = m // span_len, hi = m - span_len + 1; mid = "
                       "round_half_even((lo + hi) / 2); if mid == lo or mid == hi: mask the union of the first mid "
                       "windows; else repeat: mask = union of the first mid windows; if |mask| > m: hi = mid else lo "
                       "= mid; mid = round_half_even((lo + hi) / 2); stop when not lo < mid < hi; the result is the "
                       "last evaluated union",
        },
        "continuation": "a prompt of P frames (codes [B, K, P] in [0, vocab), e.g. codec_encode of audio, or one "
                        "row for all B) fixes frames 0..P-1 of every codebook: written into the codes before every "
                        "lm_step run; P < T. nonoverlap: the first P // span_len chunks are fixed (dont_remask) and "
                        "n_gen = T / span_len - P // span_len; stride1: the first P frames, n_gen = T - P",
        "audio": "codec_decode(codes [B, K, T] in [0, vocab)) -> [B, 1, T * hop_length] float32 at sample_rate; "
                 "magnet generate writes it peak-normalised to 0.99, 16-bit PCM",
    }
