"""Stages 3 (`magnet`) and 4 (`ar`): the engine's `LM` trained on the cached tokens, and `export`.

Both models are `engine.model.LM` (same modules, same names), so `engine.load` reads them without changes.
Text: frozen MiniLM token states (cached by the `tokens` stage) -> `lm.text_proj` (trained) -> cross-attention;
30 % of the rows get the null condition (all-zero embeddings, whose cross-attention is exactly 0; those rows are
put last and skip it, as the engine's unconditional half does).

MAGNeT objective (spec §3.6), per row: stage s ~ U{0..K-1}, u ~ U(0, 1), mask rate r = cos(π/2·u). Masking picks n
span starts uniformly without replacement among the T frames and masks L = 3 frames from each (overlaps allowed,
spans clipped at the end). A frame is left unmasked iff none of the L starts that would cover it is drawn, so
E[masked fraction] = 1 − C(T−L, n)/C(T, n); n is the table entry closest to r (the reference's lookup-table
inversion, with the edge effect ignored). Codebooks < s keep their tokens, codebooks > s are all mask tokens
(id = card); cross-entropy on the masked frames of codebook s only. Hybrid rows (`prefix_prob` of them) also keep a
known prefix in all codebooks, as Hybrid-MAGNeT's continuation decodes (`magnet_inputs`). Self-attention: full for
s = 0, banded |Δt| <= subcodes_context for s >= 1, per row (an attention mask built from the rows' stages).
Fine-tuning terms (MAGNeT, off by default): text-only rows (`marginal_weight`, `marginal_loss`) and the caption
contrast (`contrast_weight`, `contrast_loss`).

MusicGen objective: the clip's delay-pattern sequence (delays 0,1,2,3; column 0 all special), teacher forcing with
causal self-attention; logits at column c predict column c+1 for every codebook; special cells are not scored.

Training windows: `crop` frames (MAGNeT) / columns (AR) at a random offset inside the 10 s clip, with the true
positions (sinusoids at the offset), so every position of the 500-frame segment is trained at a fraction of the
cost of full 10 s sequences (a CPU budget choice).
"""
from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from magnet_engine.engine.config import ModelConfig
from magnet_engine.engine.model import LM, CrossKV, Dense, restore_attention, set_attention
from magnet_engine.engine.musicgen import DelayPattern

from . import common


@dataclass
class LMTrainConfig:
    kind: str = "magnet"  # "magnet" | "musicgen"
    steps: int = 4000
    batch: int = 8
    crop: int = 150  # frames (MAGNeT) or pattern columns (AR) per training window
    lr: float = 1e-3
    warmup: int = 50
    dim: int = 256
    num_heads: int = 4
    num_layers: int = 4
    ffn_dim: int = 1024
    # token-embedding init std: 1 gives each codebook's embedding row a norm near the sinusoids' (sqrt(dim/2)); at
    # 0.02 the positions drown the tokens and MAGNeT learns to ignore its audio context (train/README.md)
    emb_std: float = 1.0
    text_dropout: float = 0.3
    prefix_prob: float = 0.15  # MAGNeT rows trained with a known prefix in all codebooks (Hybrid-MAGNeT)
    # caption contrast (MAGNeT): weight of `contrast_loss`, its rows per step and the scale of its per-token evidence
    contrast_weight: float = 0.0
    contrast_rows: int = 4
    contrast_scale: float = 10.0
    # its rows' mask rates are uniform in [contrast_rate, 1]: the first decoding steps, where the text alone decides
    # key and tempo (with more of codebook 0 visible, the context decides them and the text cannot help)
    contrast_rate: float = 0.85
    # text-only rows (MAGNeT): weight of `marginal_loss` and its rows per step, all of codebook 0 masked
    marginal_weight: float = 0.0
    marginal_rows: int = 4
    # their target: (1 - marginal_soft) * the clip's own codes + marginal_soft * the codebook-0 histogram of all train
    # clips sharing its corpus labels `soft_labels` (ClipSpec fields, comma-separated; `code_histograms`)
    marginal_soft: float = 0.0
    soft_labels: str = "instrument,key,mode"
    init: str = ""  # start from this engine-format model folder (config.json + lm.safetensors) instead of at random
    segment_duration: float = 10.0
    text_encoder: str = common.TEXT_ENCODER  # recorded in the exported config (the engine loads it by this name)
    seed: int = 0
    save_every: int = 50
    log_every: int = 10
    eval_every: int = 200
    max_minutes: float = 50.0  # > 0: stop (and save) after this much wall time; a later run resumes


def model_config(cfg: LMTrainConfig, n_q: int, card: int, frame_rate: int, text_dim: int = common.TEXT_DIM,
                 text_encoder: str = common.TEXT_ENCODER) -> ModelConfig:
    return ModelConfig(kind=cfg.kind, dim=cfg.dim, num_heads=cfg.num_heads, num_layers=cfg.num_layers,  # type: ignore[arg-type]
                       ffn_dim=cfg.ffn_dim, card=card, n_q=n_q, text_dim=text_dim, text_encoder=text_encoder,
                       frame_rate=frame_rate, segment_duration=cfg.segment_duration, subcodes_context=5, span_len=3,
                       delays=tuple(range(n_q)) if cfg.kind == "musicgen" else ())


def init_lm(lm: LM, seed: int, emb_std: float) -> None:
    """Normal init: token embeddings std `emb_std`, other matrices 0.02 (output projections scaled by depth);
    LayerNorms at identity, biases 0."""
    g = torch.Generator().manual_seed(seed)
    depth = len(lm.layers)
    for name, p in lm.named_parameters():
        if p.dim() >= 2:
            if name.startswith("emb."):
                std = emb_std
            elif name.endswith(("out_proj.weight", "linear2.weight")):
                std = 0.02 / math.sqrt(2 * depth)
            else:
                std = 0.02
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * std)
        elif "norm" in name:
            torch.nn.init.ones_(p) if name.endswith("weight") else torch.nn.init.zeros_(p)
        else:
            torch.nn.init.zeros_(p)


# ---------------------------------------------------------------------------------------------------- masking


def span_count_table(t: int, span: int) -> torch.Tensor:
    """E[masked fraction] for n = 0..T random span starts: 1 − C(T−L, n)/C(T, n) (0 for n = 0, 1 for n > T−L)."""
    n = torch.arange(t + 1, dtype=torch.float64)
    ok = n <= t - span
    nn_ = n.clamp(max=t - span)
    log_ratio = (torch.lgamma(torch.tensor(t - span + 1.0)) - torch.lgamma(t - span - nn_ + 1)
                 - torch.lgamma(torch.tensor(t + 1.0)) + torch.lgamma(t - nn_ + 1))  # log C(T−L,n)/C(T,n)
    return torch.where(ok, 1 - log_ratio.exp(), torch.ones_like(n)).float()


def span_mask(rates: torch.Tensor, t: int, span: int, g: torch.Generator) -> torch.Tensor:
    """rates [B] in (0, 1] -> mask [B, T] bool: n(rate) random span starts (table inversion), each masking `span`
    frames; at least one frame masked per row."""
    table = span_count_table(t, span)  # [T+1]
    n = (table[None, 1:] - rates[:, None]).abs().argmin(dim=1) + 1  # [B] in 1..T
    rank = torch.rand(rates.shape[0], t, generator=g).argsort(dim=1).argsort(dim=1)  # random permutation ranks
    starts = rank < n[:, None]
    mask = starts.clone()
    for shift in range(1, span):
        mask[:, shift:] |= starts[:, :-shift]
    return mask


# ---------------------------------------------------------------------------------------------------- forward


class AttendSwitch:
    """Replaces every layer's *self*-attention op (cross-attention keeps the engine's) with SDPA under a mask set
    per batch: the band/full mask of MAGNeT's per-row stages, or causal for the AR model."""

    def __init__(self, lm: LM) -> None:
        self.mask: torch.Tensor | None = None
        self.causal = False
        set_attention(lm, self)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.causal)


def text_cross(lm: LM, bank: common.TextBank, ids: torch.Tensor) -> CrossKV:
    """Caption ids [Bc] of the conditioned rows -> per-layer cross k/v (projection trained, padding zeroed)."""
    if ids.numel() == 0:
        empty = torch.zeros(0, 1, lm.cfg.dim)
        return lm.cross_kv(empty)
    states, valid = bank.batch(ids)  # [Bc, L, text_dim], [Bc, L]
    cond = lm.text_proj(states) * valid[..., None]
    return lm.cross_kv(cond)


def run_layers(lm: LM, codes: torch.Tensor, offset: int, cross: CrossKV) -> torch.Tensor:
    """codes [N, K, T] at positions offset.. -> final hidden states after out_norm [N, T, dim]."""
    return lm.out_norm(lm.hidden(lm.embed(codes, offset), Dense(cross, None)))


def magnet_inputs(codes: torch.Tensor, card: int, span_len: int, g: torch.Generator, prefix_prob: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes [B, K, T] ground truth -> (inputs [B, K, T] with mask tokens = card, stages [B], scored mask [B, T]).

    Per row: stage s ~ U{0..K-1}, cosine mask rate, span mask on codebook s; codebooks > s all masked. A fraction
    `prefix_prob` of the rows are hybrid rows: a known prefix of P ~ U{1..T/2} frames in *all* codebooks, as the
    hybrid / continuation path decodes (the AR prefix fixed in every codebook); plain masking never shows
    codebooks > s unmasked, so these rows teach it:
        codebook < s  ##########################      # = ground truth, _ = mask token, ? = masked and scored
        codebook s    ######??#?##???#??##??#??
        codebook > s  ######___________________
                      |-P--|
    """
    b, k, t = codes.shape
    stages = torch.randint(k, (b,), generator=g)
    rates = torch.cos(math.pi / 2 * torch.rand(b, generator=g))
    mask = span_mask(rates, t, span_len, g)  # [B, T]
    hybrid = torch.rand(b, generator=g) < prefix_prob
    plen = torch.randint(1, max(2, t // 2 + 1), (b,), generator=g)
    known = torch.arange(t)[None, :] < torch.where(hybrid, plen, 0)[:, None]  # [B, T]
    mask = mask & ~known
    inp = codes.clone()
    rows = torch.arange(b)
    inp[rows, stages] = inp[rows, stages].masked_fill(mask, card)
    above = torch.arange(k)[None, :, None] > stages[:, None, None]  # [B, K, 1]: codebooks > s
    return inp.masked_fill(above & ~known[:, None, :], card), stages, mask


def magnet_loss(lm: LM, switch: AttendSwitch, codes: torch.Tensor, offset: int, cross: CrossKV,
                g: torch.Generator, prefix_prob: float = 0.0) -> torch.Tensor:
    """codes [B, K, T] (ground truth window) -> MAGNeT masked cross-entropy (mean over scored tokens)."""
    b, k, t = codes.shape
    w = lm.cfg.subcodes_context
    inp, stages, mask = magnet_inputs(codes, lm.cfg.card, lm.cfg.span_len, g, prefix_prob)
    i = torch.arange(t)
    band = (i[:, None] - i[None, :]).abs() <= w  # [T, T]
    switch.mask = (stages == 0)[:, None, None, None] | band[None, None] if w >= 0 else None  # [B, 1, T, T]
    switch.causal = False
    h = run_layers(lm, inp, offset, cross)  # [B, T, dim]
    bi, ti = mask.nonzero(as_tuple=True)
    total, count = h.new_zeros(()), 0
    for s in range(k):  # each codebook's head on the masked frames of the rows at that stage
        sel = stages[bi] == s
        if sel.any():
            logits = lm.linears[s](h[bi[sel], ti[sel]])  # [M_s, V]
            total = total + F.cross_entropy(logits, codes[bi[sel], s, ti[sel]], reduction="sum")
            count += int(sel.sum())
    return total / max(count, 1)


def foil_captions(texts: list[str], rng: np.random.Generator) -> list[str]:
    """Each caption with one attribute it states (key, mode or bpm, drawn by `rng`) changed to another value by
    `corpus.swap_attribute`; a caption that states none gets the next caption of the list (another clip's) instead."""
    from . import corpus

    out = []
    for i, text in enumerate(texts):
        stated = corpus.stated_swaps(text)
        if stated:
            out.append(corpus.swap_attribute(text, stated[int(rng.integers(len(stated)))], rng))
        else:
            out.append(texts[(i + 1) % len(texts)])
    return out  # type: ignore[return-value]


def contrast_loss(lm: LM, switch: AttendSwitch, data: TokenData, bank: common.TextBank, tokenizer: Any,
                  encoder: torch.nn.Module, cfg: LMTrainConfig, g: torch.Generator) -> torch.Tensor:
    """Caption contrast at stage 0: does the audio tell its caption from a foil that differs in one attribute?

    `cfg.contrast_rows` windows, codebook 0 span-masked at a rate uniform in [cfg.contrast_rate, 1] (codebooks above
    all masked, as at stage 0), are scored under their own caption c and under a foil c' (`foil_captions`: the key,
    mode or bpm changed). d = mean over the row's masked codebook-0 tokens of log p(x | c) − log p(x | c'), in nats
    per token, and the loss is softplus(−scale·d): the two-way classification of which caption the audio came from.
    Plain masked CE rewards a model for the attributes only in proportion to the few nats they move, and the trained
    model hardly moved on bpm and mode (caption_swap: 0.00 and 0.01 nats per token); this term asks for the
    difference itself, and is ~0 once d >> 1/scale. (Measured: it raises the caption-swap gaps, not the adherence
    of generated audio; train/README.md.)
        own   c : ##??#???##?#  -> nll_own  [n]       # = visible codebook-0 token, ? = masked and scored
        foil  c': ##??#???##?#  -> nll_foil [n]       same codes and masks, only the caption differs
    """
    n = cfg.contrast_rows
    window, off, caps = data.batch("magnet", n, cfg.crop, (), lm.cfg.card, g)  # [n, K, T]
    texts = [bank.texts[i] for i in caps.tolist()]
    foils = foil_captions(texts, np.random.default_rng(int(torch.randint(2**31, (1,), generator=g))))
    # own captions and foils encoded together, so both halves see the same text padding (as one engine batch would)
    pair_bank = common.TextBank.build(tokenizer, encoder, texts + foils, show_progress=False)
    cross = text_cross(lm, pair_bank, torch.tensor([pair_bank.index[t] for t in texts + foils]))  # 2n rows
    rates = cfg.contrast_rate + (1 - cfg.contrast_rate) * torch.rand(n, generator=g)  # [n]
    mask = span_mask(rates, window.shape[-1], lm.cfg.span_len, g)  # [n, T] scored codebook-0 frames
    cb0 = window[:, 0].masked_fill(mask, lm.cfg.card)  # [n, T]
    switch.mask, switch.causal = None, False  # stage 0 attends to every frame
    logits = stage0_logits(lm, torch.cat([cb0, cb0]), off, cross)  # [2n, T, V]
    target = torch.cat([window[:, 0], window[:, 0]])  # [2n, T]
    nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # [2n, T]
    m = torch.cat([mask, mask]).float()
    row = (nll * m).sum(1) / m.sum(1)  # [2n] mean over the scored tokens
    d = row[n:] - row[:n]  # nll(foil) − nll(own) = log p(x|c) − log p(x|c'), nats per token
    return F.softplus(-cfg.contrast_scale * d).mean()


def marginal_loss(lm: LM, switch: AttendSwitch, data: TokenData, bank: common.TextBank, cfg: LMTrainConfig,
                  g: torch.Generator, soft: CodeHistograms | None = None) -> torch.Tensor:
    """Text-only stage-0 cross-entropy: `cfg.marginal_rows` windows with *all* of codebook 0 masked, each under
    its own caption, scored on every frame. This is the distribution the first decoding step samples from, where no
    code is fixed yet and the text alone can set the key; in the plain objective the text competes with visible
    neighbours, which predict a frame better: the 4000-step LM preferred its caption's key by 0.14 nats per token, where
    per-key histograms of the codebook-0 codes prefer it by about 2 (train/README.md, "Text-only rows").
        input   ____________      _ = mask token (codebooks 1.. too)
        scored  ????????????      ? = scored
    """
    rows, caps = data.draw(cfg.marginal_rows, g)
    window, off = data.magnet_window(rows, cfg.crop, g)  # [n, K, T]
    switch.mask, switch.causal = None, False  # stage 0 attends to every frame
    hidden = torch.full_like(window[:, 0], lm.cfg.card)  # [n, T]
    logp = stage0_logits(lm, hidden, off, text_cross(lm, bank, caps)).log_softmax(-1)  # [n, T, V]
    hard = F.nll_loss(logp.transpose(1, 2), window[:, 0])
    if cfg.marginal_soft == 0:
        return hard
    assert soft is not None, "marginal_soft > 0 needs the label histograms (code_histograms)"
    q = soft.table[soft.cells[rows]]  # [n, V]: the same target for every frame of a row
    soft_ce = -(q[:, None, :] * logp).sum(-1).mean()
    return (1 - cfg.marginal_soft) * hard + cfg.marginal_soft * soft_ce


@dataclass(frozen=True)
class CodeHistograms:
    """Codebook-0 code frequencies per label cell: `cells` [N] the cell of each train clip, `table` [C, V] the
    smoothed code distribution of the clips in each cell."""
    cells: torch.Tensor
    table: torch.Tensor


def code_histograms(train: TokenData, attributes: str, card: int, prior: float = 100.0) -> CodeHistograms:
    """Cells = distinct values of the corpus labels `attributes` (e.g. "instrument,key,mode"); each cell's codebook-0
    histogram over every frame of its train clips, smoothed towards the pooled one by `prior` frames:
    (counts + prior * pooled) / (n + prior).

    As the text-only rows' target it is the clip's own codes averaged over every clip that sounds alike in those
    labels: what a caption stating them predicts of a frame, without each clip's own notes (train/README.md,
    "Soft targets"). Drawn frame by frame, per-key histograms name the key of 73% of valid clips, the text-only
    draw of an LM trained on the clips' own codes (ft2) 52%."""
    names = [a.strip() for a in attributes.split(",") if a.strip()]
    if not names:
        raise ValueError("soft_labels names no corpus label: give ClipSpec fields, e.g. 'instrument,key,mode'")
    c = common.corpus()
    known = set(asdict(c.sample_spec(train.seeds[0])))
    if not set(names) <= known:
        raise ValueError(f"soft_labels {sorted(set(names) - known)} are not corpus labels; choose from {sorted(known)}")

    index: dict[tuple[Any, ...], int] = {}
    cells = torch.tensor([index.setdefault(tuple(asdict(c.sample_spec(s))[a] for a in names), len(index))
                          for s in train.seeds])
    flat = cells[:, None] * card + train.codes[:, 0]  # [N, T] (cell, code) pairs
    counts = torch.bincount(flat.flatten(), minlength=len(index) * card).view(-1, card).double()  # [C, V]
    pooled = counts.sum(0) / counts.sum()
    table = ((counts + prior * pooled) / (counts.sum(1, keepdim=True) + prior)).float()
    return CodeHistograms(cells, table)


def ar_loss(lm: LM, switch: AttendSwitch, seq: torch.Tensor, offset: int, cross: CrossKV) -> torch.Tensor:
    """seq [B, K, C+1] delay-pattern columns offset..offset+C -> next-column cross-entropy over non-special cells."""
    inp, tgt = seq[..., :-1], seq[..., 1:]
    switch.mask, switch.causal = None, True
    h = run_layers(lm, inp, offset, cross)  # [B, C, dim]
    logits = torch.stack([lin(h) for lin in lm.linears], dim=1)  # [B, K, C, V]
    return F.cross_entropy(logits.flatten(0, 2), tgt.flatten(), ignore_index=lm.cfg.card)


# ----------------------------------------------------------------------------------------------------- data


class TokenData:
    """Cached codes [N, K, T] + caption ids [N, variants] of one split."""

    def __init__(self, work: Path, split: str, bank: common.TextBank) -> None:
        folder = work / "tokens"
        self.codes = torch.from_numpy(np.load(folder / f"{split}.npy").astype(np.int64))
        meta = json.loads((folder / f"{split}.json").read_text())
        self.seeds: list[int] = meta["seeds"]
        self.caption_ids = torch.tensor([[bank.index[c] for c in caps] for caps in meta["captions"]])

    def draw(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (clip rows [n], one caption id of each [n])."""
        rows = torch.randint(self.codes.shape[0], (n,), generator=g)
        return rows, self.caption_ids[rows, torch.randint(self.caption_ids.shape[1], (n,), generator=g)]

    def magnet_window(self, rows: torch.Tensor, crop: int, g: torch.Generator) -> tuple[torch.Tensor, int]:
        """-> (frames [B, K, crop] of those clips at one random offset, the offset)."""
        t = self.codes.shape[-1]
        crop = min(crop, t)
        off = int(torch.randint(t - crop + 1, (1,), generator=g))
        return self.codes[rows, :, off:off + crop], off

    def batch(self, kind: str, n: int, crop: int, delays: tuple[int, ...], card: int, g: torch.Generator
              ) -> tuple[torch.Tensor, int, torch.Tensor]:
        """-> (window [B, K, crop] frames (MAGNeT) or [B, K, crop + 1] pattern columns (AR), offset, caption ids)."""
        rows, caps = self.draw(n, g)
        if kind == "magnet":
            return *self.magnet_window(rows, crop, g), caps
        codes = self.codes[rows]  # [B, K, T]
        t = codes.shape[-1]
        seq = DelayPattern(delays, t).build(codes, card)  # [B, K, S]
        crop = min(crop, seq.shape[-1] - 1)
        # a quarter of the windows start at column 0, where generation starts (all-special column, first frames)
        off = 0 if float(torch.rand(1, generator=g)) < 0.25 else int(
            torch.randint(seq.shape[-1] - crop, (1,), generator=g))
        return seq[..., off:off + crop + 1], off, caps


def step_loss(lm: LM, switch: AttendSwitch, data: TokenData, bank: common.TextBank, cfg: LMTrainConfig,
              g: torch.Generator, dropout: float) -> torch.Tensor:
    window, off, caps = data.batch(cfg.kind, cfg.batch, cfg.crop, lm.cfg.delays, lm.cfg.card, g)
    keep = torch.rand(window.shape[0], generator=g) >= dropout  # False = null condition (CFG dropout)
    order = torch.cat([keep.nonzero()[:, 0], (~keep).nonzero()[:, 0]])  # conditioned rows first
    window, caps = window[order], caps[order]
    cross = text_cross(lm, bank, caps[: int(keep.sum())])
    if cfg.kind == "magnet":
        return magnet_loss(lm, switch, window, off, cross, g, cfg.prefix_prob)
    return ar_loss(lm, switch, window, off, cross)


@torch.no_grad()
def valid_loss(lm: LM, switch: AttendSwitch, data: TokenData, bank: common.TextBank, cfg: LMTrainConfig,
               n_batches: int = 4) -> float:
    """Mean loss on held-out clips with fixed batches/masks (seeded), all rows conditioned."""
    lm.eval()
    losses = [step_loss(lm, switch, data, bank, cfg, common.step_generator(12345, i), 0.0).item()
              for i in range(n_batches)]
    lm.train()
    return float(np.mean(losses))


@contextlib.contextmanager
def probing(lm: LM) -> Iterator[AttendSwitch]:
    """An evaluation of a trained model with the training attention (`AttendSwitch`) in eval mode; the model is
    handed back as it came: the engine's attention op, the caller's train/eval mode."""
    saved = set_attention(lm)  # the ops as they are, to hand back
    was_training = lm.training
    lm.eval()
    try:
        yield AttendSwitch(lm)
    finally:
        lm.train(was_training)
        restore_attention(lm, saved)


def stage0_logits(lm: LM, cb0: torch.Tensor, offset: int, cross: CrossKV) -> torch.Tensor:
    """Codebook-0 input [B, T] (mask tokens where hidden), codebooks 1.. all mask tokens -> codebook-0 logits
    [B, T, V]. With full self-attention, as stage 0 decodes: under `probing` with its switch untouched, or in
    training with the switch's mask cleared."""
    inp = cb0.new_full((cb0.shape[0], lm.cfg.n_q, cb0.shape[1]), lm.cfg.card)
    inp[:, 0] = cb0
    return lm.linears[0](run_layers(lm, inp, offset, cross))


@torch.no_grad()
def text_sensitivity(lm: LM, data: TokenData, bank: common.TextBank, crop: int = 150, batch: int = 16,
                     n_batches: int = 24, seed: int = 999) -> dict[str, float]:
    """How much a MAGNeT model reads its caption: held-out masked CE with each clip's own caption ("own"), the
    caption of the next clip in the batch ("other") and the null condition ("none"), on the same windows and
    masks. own < none: the text helps; other > none: the model acts on what the text says, not just on its
    presence. Seconds, where `bench quality` takes many minutes (and says which attribute is followed).
    """
    out: dict[str, list[float]] = {"own": [], "other": [], "none": []}
    with probing(lm) as switch:
        for i in range(n_batches):
            window, off, caps = data.batch("magnet", batch, crop, (), lm.cfg.card, common.step_generator(seed, i))
            for name, ids in (("own", caps), ("other", caps.roll(1)), ("none", caps[:0])):
                g = common.step_generator(seed + 1, i)  # same masks for the three conditions
                out[name].append(magnet_loss(lm, switch, window, off, text_cross(lm, bank, ids), g).item())
    return {name: float(np.mean(v)) for name, v in out.items()}


@torch.no_grad()
def context_gain(lm: LM, data: TokenData, bank: common.TextBank, rate: float = 0.1, crop: int = 150,
                 batch: int = 16, n_batches: int = 8, seed: int = 998) -> dict[str, float]:
    """How much a MAGNeT model reads the *audio* context of codebook 0: held-out stage-0 CE on the same spans
    (mask rate `rate`) with the rest of codebook 0 given ("context") and with it masked too ("text_only"), own
    captions in both. Real codes are far from i.i.d. (neighbouring frames share about a nat), so a model that
    decodes coherent audio has context << text_only; a model near text_only samples each frame nearly on its
    own, and a clip-level attribute (key, tempo) does not survive that.
        context    ####??#####???###?####      # = ground truth, ? = scored span
        text_only  ____??_____???___?____      _ = mask token (codebooks 1.. are mask tokens in both)
    """
    out: dict[str, list[float]] = {"context": [], "text_only": []}
    with probing(lm):
        for i in range(n_batches):
            g = common.step_generator(seed, i)
            window, off, caps = data.batch("magnet", batch, crop, (), lm.cfg.card, g)
            cb0 = window[:, 0]  # [B, T]
            scored = span_mask(torch.full((cb0.shape[0],), rate), cb0.shape[1], lm.cfg.span_len, g)  # [B, T]
            cross = text_cross(lm, bank, caps)
            for name, hidden in (("context", scored), ("text_only", torch.ones_like(scored))):
                logits = stage0_logits(lm, cb0.masked_fill(hidden, lm.cfg.card), off, cross)  # [B, T, V]
                out[name].append(F.cross_entropy(logits[scored], cb0[scored]).item())
    return {name: float(np.mean(v)) for name, v in out.items()}


@torch.no_grad()
def caption_swap(lm: LM, data: TokenData, bank: common.TextBank, swap: Callable[[str], str | None],
                 tokenizer: Any, encoder: torch.nn.Module, batch: int = 16) -> dict[str, float]:
    """Does a MAGNeT model act on one attribute of its caption? Text-only stage-0 CE (all of codebook 0 masked) of
    each clip's codebook 0 under each of its captions and under the same caption edited by `swap` (e.g.
    `corpus.swap_attribute(text, "key")`; None = the caption does not state it, skipped). Returns the mean CE per
    token for "own" and "swapped", "prefer_own" (the fraction of pairs where the own caption scores lower) and the
    pair count "n". swapped − own is what the model knows of that attribute from the text alone, before it fixes any
    code; text_sensitivity changes every attribute at once."""
    texts = bank.texts
    pairs = [(row, texts[i], edited) for row, ids in enumerate(data.caption_ids.tolist()) for i in ids
             if (edited := swap(texts[i])) is not None]
    if not pairs:
        raise ValueError("no caption of this split states the swapped attribute: nothing to compare")
    swapped_bank = common.TextBank.build(tokenizer, encoder, [p[2] for p in pairs])
    own, swapped = [], []
    with probing(lm):
        for sl in common.batches(len(pairs), batch):
            target = data.codes[[p[0] for p in pairs[sl]], 0]  # [b, T]
            hidden = torch.full_like(target, lm.cfg.card)  # all of codebook 0 masked: the text alone
            for out, b, ids in ((own, bank, [bank.index[p[1]] for p in pairs[sl]]),
                                (swapped, swapped_bank, [swapped_bank.index[p[2]] for p in pairs[sl]])):
                logits = stage0_logits(lm, hidden, 0, text_cross(lm, b, torch.tensor(ids)))  # [b, T, V]
                out.append(F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(1))  # [b]
    o, s = torch.cat(own), torch.cat(swapped)
    return {"own": float(o.mean()), "swapped": float(s.mean()), "prefer_own": float((o < s).float().mean()),
            "n": float(len(pairs))}


# ---------------------------------------------------------------------------------------------------- train


def stage_folder(work: Path, kind: str) -> Path:
    return work / ("magnet" if kind == "magnet" else "ar")


def train_lm(work: Path, cfg: LMTrainConfig) -> LM:
    """Train (or resume) one LM in `work/magnet` or `work/ar` on `work/tokens`."""
    folder = stage_folder(work, cfg.kind)
    common.seed_all(cfg.seed)
    from .codec import load_trained_codec

    codec_cfg = load_trained_codec(work).config
    bank = common.TextBank.load(work / "tokens" / "text.safetensors")
    train, valid = TokenData(work, "train", bank), TokenData(work, "valid", bank)
    mcfg = model_config(cfg, codec_cfg.n_q, codec_cfg.bins, codec_cfg.frame_rate, int(bank.states.shape[-1]),
                        cfg.text_encoder)
    lm = LM(mcfg)
    init_lm(lm, cfg.seed, cfg.emb_std)
    if (cfg.contrast_weight > 0 or cfg.marginal_weight > 0) and cfg.kind != "magnet":
        raise ValueError("contrast_weight and marginal_weight are MAGNeT objectives: set them only for "
                         "`python -m magnet_engine.train magnet`")
    if not 0 <= cfg.marginal_soft <= 1:
        raise ValueError(f"marginal_soft mixes two targets: give a value in [0, 1], got {cfg.marginal_soft}")
    if cfg.init:  # fine-tuning: the starting weights of a trained model (same sizes), fresh optimizer and schedule
        from magnet_engine.engine.loading import read_own_format

        lm.load_state_dict({k: v.float() for k, v in read_own_format(Path(cfg.init))[1].items()})
    soft = (code_histograms(train, cfg.soft_labels, mcfg.card)
            if cfg.marginal_weight > 0 and cfg.marginal_soft > 0 else None)
    # the frozen text encoder, for the foils of the caption contrast (encoded as they are drawn)
    text_model = common.load_frozen_text_encoder(cfg.text_encoder) if cfg.contrast_weight > 0 else None
    decay = [p for n, p in lm.named_parameters() if p.dim() >= 2 and not n.startswith("emb")]
    other = [p for n, p in lm.named_parameters() if not (p.dim() >= 2 and not n.startswith("emb"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    start = 0
    got = common.load_checkpoint(folder, "ckpt", opt)
    if got is not None:
        tensors, meta = got
        lm.load_state_dict(tensors)
        start = int(meta["step"])
    switch = AttendSwitch(lm)
    lm.train()
    bar = common.progress(cfg.steps, start, cfg.kind)
    timer = common.Timer()
    for step in range(start, cfg.steps):
        g = common.step_generator(cfg.seed, step)
        for group in opt.param_groups:
            group["lr"] = common.cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup)
        loss = step_loss(lm, switch, train, bank, cfg, g, cfg.text_dropout)
        contrast = (contrast_loss(lm, switch, train, bank, *text_model, cfg, g) if text_model is not None
                    else loss.new_zeros(()))
        marginal = (marginal_loss(lm, switch, train, bank, cfg, g, soft) if cfg.marginal_weight > 0
                    else loss.new_zeros(()))
        opt.zero_grad(set_to_none=True)
        (loss + cfg.contrast_weight * contrast + cfg.marginal_weight * marginal).backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        bar.update(1)
        last = step == cfg.steps - 1
        out_of_time = cfg.max_minutes > 0 and timer.minutes > cfg.max_minutes
        evaluate = (step + 1) % cfg.eval_every == 0 or last or out_of_time
        if step % cfg.log_every == 0 or evaluate:
            rec: dict[str, Any] = {"step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"],
                                   "min": round(timer.minutes, 2)}
            if text_model is not None:
                rec["contrast"] = contrast.item()
            if cfg.marginal_weight > 0:
                rec["marginal"] = marginal.item()
            if evaluate:
                rec["valid"] = valid_loss(lm, switch, valid, bank, cfg)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            common.append_log(folder, rec)
        if (step + 1) % cfg.save_every == 0 or last or out_of_time:
            common.save_checkpoint(folder, "ckpt", lm.state_dict(), opt,
                                   {"step": step + 1, "config": asdict(cfg), "model": mcfg.to_dict()})
        if out_of_time:
            break
    bar.close()
    return lm.eval()


def load_trained_lm(work: Path, kind: str) -> LM:
    got = common.load_checkpoint(stage_folder(work, kind), "ckpt")
    if got is None:
        raise ValueError(f"no {kind} checkpoint in {stage_folder(work, kind)}: train it first")
    tensors, meta = got
    lm = LM(ModelConfig.from_dict(meta["model"]))
    lm.load_state_dict(tensors)
    return lm.eval()


# ---------------------------------------------------------------------------------------------------- export

# The models' own decoding defaults (config.json "generation", read by engine.load). MAGNeT: codebook 0 in one step,
# each frame drawn from the text-conditioned distribution at temperature 1 without guidance; the released models'
# settings (temperature 3 annealed, guidance 10 -> 1, 20 steps) re-decode it from a context this small LM does not
# keep in one key (valid key 0.52 against 0.23 at 10,4,4,4, same weights; train/README.md "Text-only rows").
# Fastest too.
MAGNET_GENERATION: dict[str, Any] = {"steps": [1, 4, 4, 4], "temperature": 1.0, "anneal_temp": False, "cfg": [1.0]}
AR_GENERATION: dict[str, Any] = {}


def export(work: Path, assets: Path, kinds: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Engine-format folders `assets/magnet-default` and `assets/musicgen-default` (LM fp16, codec fp32). `kinds`
    None: every LM trained in `work` (a fine-tuning folder holds only MAGNeT)."""
    from magnet_engine.engine.loading import save_pretrained

    from .codec import load_trained_codec

    if kinds is None:
        kinds = tuple(k for k in ("magnet", "musicgen") if common.has_checkpoint(stage_folder(work, k), "ckpt"))
        if not kinds:
            raise ValueError(f"no trained LM in {work}: run `python -m magnet_engine.train magnet` (or `ar`) there "
                             "first")
    codec = load_trained_codec(work)
    out = {}
    for kind in kinds:
        lm = load_trained_lm(work, kind)
        folder = assets / f"{kind}-default"
        save_pretrained(folder, lm, codec, dtype=torch.float16,
                        generation=MAGNET_GENERATION if kind == "magnet" else AR_GENERATION)
        out[kind] = folder
    return out
