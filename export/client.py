"""An independent MAGNeT client of a `magnet export` folder, as a product engineer writes one in any language: it
reads only the folder (manifest.json's "client" section, the graphs, tokenizer/tokenizer.json) and uses only
onnxruntime, numpy and `tokenizers`. Nothing of the engine or of the rest of `export` is imported (a test checks
this), so a test that it is token-exact on the fixture tests the manifest's contract, not the engine against itself.

Greedy by default; `greedy=False` samples by the manifest's rule (decoding.sampling: one uniform per position,
nucleus or top-k, inverse CDF) from `uniforms` given per step (the conformance vectors' sampled cases carry the
engine's) or else from a numpy generator seeded `seed`. `trace` collects what the conformance vectors state per step
(export/conformance.py): re-masked units, span scores, a few logits.

Shapes: B prompts, K codebooks, T frames, L text tokens, V vocabulary, C span chunks.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


class Noise(Protocol):
    def __call__(self, b: int, t: int) -> np.ndarray:
        """-> one step's uniforms [B, T] float32 in [0, 1)."""


class Client:
    def __init__(self, export_dir: str | Path) -> None:
        d = Path(export_dir)
        self.manifest = json.loads((d / "manifest.json").read_text())
        self.c = self.manifest["client"]
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.sessions = {name: ort.InferenceSession(str(d / g["file"]), so, providers=["CPUExecutionProvider"])
                         for name, g in self.manifest["graphs"].items()}
        self.tokenizer = Tokenizer.from_file(str(d / self.c["text"]["tokenizer"]))
        self.kv_names = self.manifest["cross_kv_names"]

    def text(self, prompts: list[str | None]) -> np.ndarray:
        """The padding rule: each prompt alone, zero-padded to the longest; None = all-zero row. -> [B, L, dim]."""
        embeds = []
        for p in prompts:
            if p is None:
                embeds.append(None)
                continue
            ids = np.array([self.tokenizer.encode(p, add_special_tokens=self.c["text"]["add_special_tokens"]).ids],
                           dtype=np.int64)
            embeds.append(self.sessions["text_encoder"].run(None, {"input_ids": ids,
                                                                   "attention_mask": np.ones_like(ids)})[0][0])
        length = max([1] + [e.shape[0] for e in embeds if e is not None])
        dim = self.manifest["model_config"]["dim"]
        out = np.zeros((len(prompts), length, dim), dtype=np.float32)
        for i, e in enumerate(embeds):
            if e is not None:
                out[i, : e.shape[0]] = e
        return out

    def plan(self, s: int, n_steps: int, n_gen: int, cfg: list[float], temperature: float, anneal: bool
             ) -> list[tuple[int, float, float]]:
        """(n_mask, cfg, temperature) per step of stage s: the stored tables when the settings are the defaults,
        else the stored float32 mask fractions and the stated rule (no cosine evaluated here)."""
        d = self.c["defaults"]
        table = self.c["schedule"]["default"][s] if s < len(self.c["schedule"]["default"]) else None
        if (table is not None and table["steps"] == n_steps and cfg == d["cfg"] and temperature == d["temperature"]
                and anneal == d["anneal_temp"]):
            return [(table["n_mask"][i][n_gen - 1], table["cfg"][i], table["temperature"][i])
                    for i in range(n_steps)]
        cmax, cmin = cfg[0], cfg[-1]
        out = []
        for i, p in enumerate(self.c["schedule"]["mask_p_by_steps"][str(n_steps)]):
            n = max(1, int(np.float32(p) * np.float32(n_gen)))
            t = temperature * ((n_steps - 1 - i) / n_steps) if anneal else temperature
            out.append((n, p * cmax + (1 - p) * cmin, max(t, 0.01)))
        return out

    def generate(self, prompts: list[str | None], *, steps: list[int] | None = None, cfg: list[float] | None = None,
                 temperature: float | None = None, anneal_temp: bool | None = None,
                 span_arrangement: str | None = None, span_scoring: str | None = None,
                 duration: float | None = None, context: float | None = None, prompt_codes: np.ndarray | None = None,
                 greedy: bool = True, top_k: int | None = None, top_p: float | None = None,
                 uniforms: Any = None, seed: int | None = None, trace: list[dict] | None = None) -> np.ndarray:
        """-> codes [B, K, T] int64; past the segment, window by window (manifest longform). Greedy unless
        `greedy` is False: then each step draws one uniform per position from `uniforms` ([S][B][T], one [B][T] per
        decoding step in order, every window's; all must be used) or, without them, from numpy seeded `seed`."""
        d = self.c["defaults"]
        arrangement = span_arrangement or d["span_arrangement"]
        noise = None if greedy else GivenNoise(uniforms) if uniforms is not None else seeded_noise(seed)
        kw = dict(steps=steps or d["steps"], cfg=cfg or d["cfg"],
                  temperature=d["temperature"] if temperature is None else temperature,
                  anneal=d["anneal_temp"] if anneal_temp is None else anneal_temp, arrangement=arrangement,
                  scoring=span_scoring or d["span_scoring"], noise=noise,
                  top_k=d["top_k"] if top_k is None else top_k, top_p=d["top_p"] if top_p is None else top_p)
        codes = self._generate(prompts, duration, context, prompt_codes, trace, kw)
        if isinstance(noise, GivenNoise) and noise.left:
            raise ValueError(f"uniforms hold {noise.left} more step{'s' if noise.left > 1 else ''} than the run "
                             "decoded: give one [B][T] per decoding step")
        return codes

    def _generate(self, prompts: list[str | None], duration: float | None, context: float | None,
                  prompt_codes: np.ndarray | None, trace: list[dict] | None, kw: dict[str, Any]) -> np.ndarray:
        c, d = self.c, self.c["defaults"]
        span, max_t = c["span_len"], c["limits"]["frames"][1]
        arrangement = kw["arrangement"]
        n = round((duration or d["duration"]) * c["frame_rate"])  # Python's round: half to even, as the rule says
        s = span if arrangement == "nonoverlap" else 1
        w = max_t - max_t % s
        kv = self.sessions["cross_kv"].run(self.kv_names, {"text_embeds": self.text(prompts)})
        if n <= max_t:
            return self._segment(kv, len(prompts), n - n % s, prompt_codes, trace, window=0, **kw)
        ctx = round((c["longform"]["context_seconds_default"] if context is None else context) * c["frame_rate"])
        piece = self._segment(kv, len(prompts), w, prompt_codes, trace, window=0, **kw)
        index = 0
        while piece.shape[-1] < n:  # each window continues from the piece's last ctx frames
            keep = min(n - piece.shape[-1], w - ctx)
            length = min(w, -(-(ctx + keep) // s) * s)
            index += 1
            out = self._segment(kv, len(prompts), length, piece[..., -ctx:], trace, index, **kw)
            piece = np.concatenate([piece, out[..., ctx:ctx + keep]], axis=-1)
        return piece

    def _segment(self, kv: list[np.ndarray], b: int, t: int, prompt_codes: np.ndarray | None,
                 trace: list[dict] | None, window: int, steps: list[int], cfg: list[float], temperature: float,
                 anneal: bool, arrangement: str, scoring: str, noise: Noise | None, top_k: int, top_p: float
                 ) -> np.ndarray:
        """One segment of T frames (the prompt's included) -> codes [B, K, T]."""
        c = self.c
        span, mask_id, k, dont = c["span_len"], c["mask_id"], c["codebooks"], c["spans"]["dont_remask"]
        guided = not (cfg[0] == 1.0 and cfg[-1] == 1.0)
        feeds: dict[str, Any] = dict(zip(self.kv_names, kv))
        codes = np.full((b, k, t), mask_id, dtype=np.int64)
        p = 0 if prompt_codes is None else prompt_codes.shape[-1]
        if prompt_codes is not None:
            codes[..., :p] = prompt_codes
        chunked = arrangement == "nonoverlap" or span == 1
        for stage, n_steps in enumerate(steps):
            row = np.full((b, t), mask_id, dtype=np.int64)
            n_prompt = p // span if chunked else p
            scores = np.zeros((b, t // span if chunked else t), dtype=np.float32)
            scores[:, :n_prompt] = dont
            n_gen = scores.shape[1] - n_prompt
            for i, (n_mask, coef, temp) in enumerate(self.plan(stage, n_steps, n_gen, cfg, temperature, anneal)):
                if chunked:
                    chunks = np.zeros(scores.shape, dtype=bool)
                    np.put_along_axis(chunks, self.rank(scores)[:, :n_mask], True, axis=1)
                    remask = np.repeat(chunks, span, axis=1)
                else:
                    remask = least_probable_spans(scores, n_mask, span, self.rank)
                units = chunks if chunked else remask
                row[remask] = mask_id
                if prompt_codes is not None:
                    row[:, :p] = prompt_codes[:, stage]
                codes[:, stage] = row
                feeds["codes"] = np.concatenate([codes, codes]) if guided else codes
                feeds["stage"] = np.array(stage, dtype=np.int64)
                logits = self.sessions["lm_step"].run(["logits"], feeds)[0]  # [N, T, V]
                cond, uncond = (logits[:b], logits[b:]) if guided else (logits, logits)
                g = self.guidance(cond, uncond, coef)
                sampled, chosen = self.choose(g, temp, None if noise is None else noise(b, t), top_k, top_p)
                masked = row == mask_id
                row = np.where(masked, sampled, row)
                codes[:, stage] = row
                if chunked:
                    per = chosen.reshape(b, -1, span)
                    s = 1 - per.max(-1) if scoring == "max" else (-np.log(per)).sum(-1)
                    scores = np.where(chunks, s, np.float32(dont)).astype(np.float32)
                else:
                    scores = np.where(masked, -np.log(chosen), np.float32(dont)).astype(np.float32)
                if trace is not None:
                    trace.append({"window": window, "stage": stage, "step": i, "n_mask": n_mask,
                                  "remasked": [np.flatnonzero(u).tolist() for u in units],
                                  "scores": scores.tolist(), "logits": probes(logits)})
        return codes

    def choose(self, g: np.ndarray, temp: float, u: np.ndarray | None, top_k: int, top_p: float
               ) -> tuple[np.ndarray, np.ndarray]:
        """manifest decoding.probs, greedy (u None) and sampling: guided logits g [B, T, V] float32, uniforms u [B, T]
        -> (tokens [B, T], their probabilities [B, T] float32: what scores the spans; top-k's renormalised)."""
        z = g / np.float32(temp)
        e = np.exp(z - z.max(-1, keepdims=True))
        probs = e / e.sum(-1, keepdims=True)
        if u is None:
            tokens = g.argmax(-1)
        elif top_p > 0:
            tokens = self.draw(np.where(self.nucleus(probs, top_p), probs, 0), u)
        elif top_k > 0:
            kept = np.where(self.top_k_keep(probs, top_k), probs, 0)
            probs = (kept / kept.sum(-1, keepdims=True)).astype(np.float32)
            tokens = self.draw(probs, u)
        else:
            tokens = self.draw(probs, u)
        return tokens, np.take_along_axis(probs, tokens[..., None], -1)[..., 0]

    @staticmethod
    def nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
        """[.., V] -> bool [.., V]: probs >= p*, the last probability kept by the sorted exclusive cumsum <= top_p
        (at least one)."""
        ordered = -np.sort(-probs, axis=-1)
        exclusive = np.cumsum(ordered.astype(np.float64), axis=-1) - ordered
        n_keep = np.maximum((exclusive <= top_p).sum(-1, keepdims=True), 1)
        return probs >= np.take_along_axis(ordered, n_keep - 1, -1)

    @staticmethod
    def top_k_keep(probs: np.ndarray, k: int) -> np.ndarray:
        """[.., V] -> bool [.., V]: probs >= the k-th largest."""
        v = probs.shape[-1]
        return probs >= np.partition(probs, v - k, axis=-1)[..., v - k:v - k + 1]

    @staticmethod
    def draw(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Inverse CDF: weights [.., V] >= 0, u [..] in [0, 1) -> [..] the first index whose cumulative weight
        exceeds u * total weight."""
        cdf = np.cumsum(weights.astype(np.float64), axis=-1)
        index = (cdf <= (u * cdf[..., -1])[..., None]).sum(-1)
        return np.minimum(index, weights.shape[-1] - 1)

    @staticmethod
    def guidance(cond: np.ndarray, uncond: np.ndarray, coef: float) -> np.ndarray:
        """manifest decoding.guidance: the step's cfg (float64 in the schedule) rounded to float32, float32
        arithmetic. cond, uncond [B, T, V] float32 -> [B, T, V] float32."""
        return uncond + (cond - uncond) * np.float32(coef)

    @staticmethod
    def rank(scores: np.ndarray) -> np.ndarray:
        """manifest spans.ties: [B, C] -> [B, C] indices by descending score, lower index first among exactly
        equal scores (a stable sort)."""
        return np.argsort(-scores, axis=-1, kind="stable")

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return self.sessions["codec_decode"].run(["audio"], {"codes": codes})[0]


def probes(logits: np.ndarray) -> list[list[float]]:
    """A few of a step's raw lm_step logits [N, T, V], as [row, frame, token, value]: the first and last row and
    frame, at token 0 and at the row-frame's argmax."""
    n, t, _ = logits.shape
    out = []
    for r in sorted({0, n - 1}):
        for f in sorted({0, t - 1}):
            for v in sorted({0, int(logits[r, f].argmax())}):
                out.append([r, f, v, float(logits[r, f, v])])
    return out


def least_probable_spans(scores: np.ndarray, n_target: int, span: int, rank: Any = Client.rank) -> np.ndarray:
    """stride1, as the manifest's spans.stride1 states it. scores [B, T] -> [B, T] bool; `rank` orders [B, W]
    window sums as Client.rank does (the tie rule)."""
    b, t = scores.shape
    w = t - span + 1
    windows = sum(scores[:, i:i + w] for i in range(span))  # [B, W]
    out = np.zeros((b, t), dtype=bool)
    m = max(n_target, span)
    for j in range(b):
        order = rank(windows[j:j + 1])[0]

        def cover(u: int, order: np.ndarray = order) -> np.ndarray:
            mask = np.zeros(t, dtype=bool)
            for start in order[:u]:
                mask[start:start + span] = True
            return mask

        lo, hi = m // span, m - span + 1
        mid = round((lo + hi) / 2)
        mask = cover(mid)
        while lo < mid < hi:
            mask = cover(mid)
            if mask.sum() > m:
                hi = mid
            else:
                lo = mid
            mid = round((lo + hi) / 2)
        out[j] = mask
    return out


class GivenNoise:
    """Uniforms [S][B][T] as a noise source: one [B, T] per call, in order. Raises ValueError when a step's shape
    differs or none is left; `left` counts the steps not yet used."""

    def __init__(self, uniforms: Any) -> None:
        self.steps = [np.asarray(u, dtype=np.float32) for u in uniforms]
        self.used = 0

    @property
    def left(self) -> int:
        return len(self.steps) - self.used

    def __call__(self, b: int, t: int) -> np.ndarray:
        if not self.left:
            raise ValueError("the uniforms ran out: give one [B][T] per decoding step (every window's)")
        u = self.steps[self.used]
        if u.shape != (b, t):
            raise ValueError(f"uniforms of step {self.used} are {list(u.shape)}; that step samples [{b}, {t}]")
        self.used += 1
        return u


def seeded_noise(seed: int | None) -> Noise:
    rng = np.random.default_rng(seed)
    return lambda b, t: rng.random((b, t), dtype=np.float32)
