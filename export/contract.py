"""The manifest's "client" section: everything a client in another language needs to decode like the engine.

A client with onnxruntime, a tokenizer that reads `tokenizer/tokenizer.json`, and this section reproduces
`magnet.decode_step` without reading Python: the defaults, the mask id, the rows of `lm_step`, the text padding
rule, the span rules, continuation, the limits, and the mask schedule as stored numbers (float32 mask fractions and
the number of spans to re-mask for every span count), so that no client evaluates a cosine. The numbers come from
the engine's own `stage_schedule`; the rules below are `engine.magnet.decode_step` in words. Schema:
`export/manifest.schema.json`; clients that follow it: `export/client.py`, `export/node/magnet.mjs`.

Sampling stays in the client, not in the graph: README, "ONNX: the export, driven from any language", says why.
"""
from __future__ import annotations

from typing import Any

from magnet_engine.engine.config import MAX_DURATION, GenerationConfig, ModelConfig
from magnet_engine.engine.longform import DEFAULT_CONTEXT
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


def _boundary(graph_guard: str) -> dict[str, Any]:
    """What each graph takes (the numbers are in `limits`), what a client checks before running it, and what the
    graph itself does with an input outside it."""
    return {
        "text_encoder": "input_ids and attention_mask [1, l] int64 of the same shape, 1 <= l <= "
                        "limits.text_tokens_max, ids in limits.text_ids: one prompt per run (text.rule)",
        "cross_kv": "text_embeds [B, L, dim] float32, B >= 1, L >= 1 (text.rule builds it); run once per request",
        "lm_step": "codes [N, K, T] int64 in limits.lm_step_codes, 1 <= T <= limits.frames[1]; stage [] int64 in "
                   "limits.stage; every cross_k_i/cross_v_i the output of one cross_kv run: [B, H, L, D] with the "
                   "same B and L; N = 2B when guided, N = B when not (rows.guided, rows.unguided); a client that "
                   "knows whether it guides checks B = N / 2 or N",
        "codec_decode": "codes [B, K, T] int64 in limits.codec_codes, K = codebooks, T >= 1",
        "codec_encode": "audio [B, 1, S] float32 at sample_rate, S >= 1",
        "graph_guard": graph_guard,
        "client": "a client refuses an input outside these rules with one line, before any graph runs",
    }


def client_contract(cfg: ModelConfig, gen: GenerationConfig, codec: dict[str, Any], text_vocab: int,
                    text_max_tokens: int, graph_guard: str) -> dict[str, Any]:
    """The "client" section for a model `cfg` whose defaults are `gen` (already the model's own). `graph_guard`:
    the sentence saying how the graphs refuse inputs outside `boundary` (onnx_export states it)."""
    span, max_t = cfg.span_len, cfg.max_frames
    context = int(round(cfg.segment_duration * DEFAULT_CONTEXT * cfg.frame_rate))
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
            "duration_seconds": [1.0 / cfg.frame_rate, MAX_DURATION],  # past the segment: longform
            "stage": [0, cfg.n_q - 1],
            "steps_per_stage": [1, MAX_TABLE_STEPS],
            "top_k": [0, cfg.card],
            "top_p": [0.0, 1.0],
            "temperature_min": 0.0,
            "text_tokens_max": text_max_tokens,
            "text_ids": [0, text_vocab - 1],  # inclusive
            "lm_step_codes": [0, cfg.card],  # inclusive: the mask id is an input token
            "codec_codes": [0, cfg.card - 1],  # inclusive: finished tokens only
        },
        "frames_rule": "T = round(duration * frame_rate) (round half to even), T >= 1; T <= limits.frames[1]: one "
                       "segment, where nonoverlap with span_len > 1 trims T to T - T % span_len before decoding "
                       "(output_frames); T > limits.frames[1]: a long piece of exactly T frames (longform)",
        "rows": {
            "guided": "lm_step codes = [codes; codes] (N = 2B): rows 0..B-1 attend to the text, rows B..2B-1 are "
                      "unconditional; logits rows split the same way (cond = rows 0..B-1, uncond = rows B..2B-1)",
            "unguided": "guided is false exactly when cfg[0] == 1.0 and cfg[-1] == 1.0 (guidance 1 at every step); "
                        "then N = B: lm_step runs the conditional rows only and cond = uncond = its logits",
            "cross_kv": "cross_k_i/cross_v_i always have B rows, the prompts' own (cross_kv of the [B, L, dim] "
                        "text of text.rule), in both cases: lm_step treats codes rows 0..B-1 as conditional and "
                        "every row past the k/v rows as unconditional (no text). Never pass k/v of [cond; null] "
                        "(2B rows) for a guided step: the graph cannot tell it from an unguided step of 2B prompts "
                        "and computes that instead",
            "null_prompt": "a null prompt (an unconditional sample) is one of the B prompts whose text row is all "
                           "zero; it is not the unconditional half of guidance",
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
        "boundary": _boundary(graph_guard),
        "decoding": {
            "order": "stages 0..K-1 one after another; codebook `stage` starts all mask_id; codebooks past the "
                     "stage stay mask_id while it is decoded",
            "step": "remask the chosen spans of row `stage` (set mask_id), re-write the prompt frames, run lm_step "
                    "(codes, stage) -> logits [N, T, V] of codebook `stage`, sample, write the sampled tokens at "
                    "the masked positions only, compute the span scores for the next step",
            "cfg_order": "cfg is [cfg_max, cfg_min] or [c] (c = cfg_max = cfg_min): cfg_max = cfg[0] weighs the "
                         "first step (mask_p = 1), cfg_min = cfg[-1] the last",
            "guidance": "logits = uncond + (cond - uncond) * float32(cfg), float32, in this order; the step's cfg "
                        "(schedule, float64) is rounded to float32 before it is used",
            "probs": "softmax(logits / float32(temperature)) in float32 (the step's temperature, float64 in the "
                     "schedule, rounded to float32 first); they score the spans",
            "greedy": "token = argmax(logits) (first index among equals); its probability from probs",
            "sampling": "one uniform u in [0, 1) per position; top_p > 0: keep tokens whose probability is >= the "
                        "threshold p* = the probability of the last token kept by the sorted exclusive cumsum "
                        "<= top_p (at least one); else top_k > 0: keep probs >= the k-th largest, renormalise (the "
                        "renormalised probability then scores the spans); pick the first index whose cumulative "
                        "weight exceeds u * total weight. Noise source differs per client: sampled runs agree in "
                        "distribution, greedy runs token for token, and sampled runs given the same u (a conformance "
                        "vector's uniforms: one [B][T] per step, position (b, t) row-major) token for token",
        },
        "spans": {
            "dont_remask": DONT_REMASK,
            "nonoverlap": "chunks of span_len frames (T a multiple of span_len). Scores [B, T/span_len] start at 0 "
                          "for generated chunks and dont_remask for the prompt's (P // span_len chunks). Each step "
                          "re-masks the n_mask highest-scored chunks (ranked as spans.ties says). After sampling: "
                          "scoring max: "
                          "1 - max(prob over the chunk); prod: sum(-log prob over the chunk), summed in frame order "
                          "in float32; prob at every frame of the chunk is the probability of the token the step "
                          "chose there (argmax or draw), also at frames that keep their token (prompt frames of a "
                          "continuation); chunks not re-masked at this step get dont_remask",
            "stride1": "every window of span_len frames is a candidate. Scores [B, T]: -log prob where the step "
                       "sampled, dont_remask elsewhere (initially 0 for generated frames, dont_remask for the "
                       "prompt). Window score = sum of its span_len frame scores in frame order, float32; rank "
                       "windows as spans.ties says. m = max(n_mask, span_len); lo = m // span_len, hi = m - "
                       "span_len + 1; mid = round_half_even((lo + hi) / 2); if mid == lo or mid == hi: mask the "
                       "union of the first mid windows; else repeat: mask = union of the first mid windows; "
                       "if |mask| > m: hi = mid else lo = mid; mid = round_half_even((lo + hi) / 2); stop when "
                       "not lo < mid < hi; the result is the last evaluated union",
            "ties": "ranking is by score, descending; among exactly equal scores the lower index (chunk or window "
                    "start) ranks first (a stable sort of the negated scores). This is the format's rule, which "
                    "the export's clients and conformance vectors follow. The torch engine orders exactly equal "
                    "scores as torch's unstable sort does (unspecified), so it can differ from a client only "
                    "when equal scores straddle the cut, after a stage's first step. At a stage's first step "
                    "every generated unit scores 0 and the whole row is mask_id, so its ties never change a "
                    "token; later ties need exactly equal float32 scores (e.g. probabilities that saturate to 1)",
        },
        "continuation": "a prompt of P frames (codes [B, K, P] in limits.codec_codes, e.g. codec_encode of audio, "
                        "or one row for all B) with 1 <= P < T: T counts the prompt's frames, and the output [B, "
                        "K, T] holds the prompt in frames 0..P-1. Frames 0..P-1 of every codebook are written into "
                        "the codes before every lm_step run and are never replaced by a sampled token (only "
                        "mask_id positions take one). nonoverlap: the first P // span_len chunks are fixed "
                        "(dont_remask) and n_gen = T / span_len - P // span_len; when P ends mid-chunk, that chunk "
                        "is generated like any other: it is re-masked and scored as a whole (its prompt frames "
                        "keep their tokens, and their chosen-token probabilities count in its score). stride1: "
                        "the first P frames are fixed, n_gen = T - P",
        "longform": {
            "context_seconds_default": cfg.segment_duration * DEFAULT_CONTEXT,
            "context_frames_default": context,
            "rule": "a piece of N = round(duration * frame_rate) > limits.frames[1] frames is generated window by "
                    "window. W = one segment's output frames (T = limits.frames[1] after frames_rule's trim), "
                    "C = round(context * frame_rate) "
                    "(default context_frames_default; 1 <= C < W), s = span_len for nonoverlap, else 1. Window 0 "
                    "is the plain one-segment run (the duration of the segment, same settings and prompt): it "
                    "gives the piece's first W frames, end = W. While end < N: keep = min(N - end, W - C), "
                    "length = min(W, ceil((C + keep) / s) * s); the window continues (continuation) from the "
                    "piece's last C frames as its prompt, with duration length / frame_rate and the same text, "
                    "settings and seed; its frames C..C+keep-1 are appended to the piece; end += keep. The piece "
                    "has exactly N frames; decode it whole (codec_decode)",
        },
        "audio": "codec_decode(codes [B, K, T] in [0, vocab)) -> [B, 1, T * hop_length] float32 at sample_rate; "
                 "magnet generate writes it peak-normalised to 0.99, 16-bit PCM",
    }
