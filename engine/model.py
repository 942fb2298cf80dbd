"""The language model shared by MAGNeT and MusicGen: a plain pre-LN transformer over summed codebook embeddings.

Module and parameter names follow audiocraft's `LMModel`, so a released `best_state` loads key for key (the text
projection `condition_provider.conditioners.description.output_proj` is renamed `text_proj`).

    codes [N, K, T] ─ Σ_k emb[k] ─ + sin positions ─ layers × (self-attn, cross-attn to text, GELU MLP) ─ LN ─ heads

Shapes: N batch rows (2B under guidance: [cond; uncond]), K codebooks, T frames, L text length, H heads, D head dim,
V vocabulary (`card`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import ModelConfig


class TextKV(NamedTuple):
    """One layer's text keys and values (`CrossAttention.kv`), each [B, H, L, D]."""

    k: torch.Tensor
    v: torch.Tensor


class FoldedText(NamedTuple):
    """One layer's cross-attention with the text folded into its projections (`fold_texts`), per text row b:

        scores[b] [H·L, dim]: row (h, l) = W_q,hᵀ k_h,l / √D, so a frame's scores are norm(x) @ scores[b]ᵀ
        values[b] [dim, H·L]: column (h, l) = W_o,h v_h,l, so the branch is softmax_h(scores + mask[b]) @ values[b]ᵀ
        mask[b] [1, H·L] fp32: 0 at the text's tokens, -inf where L pads the text to a quantum (`fold_texts`)

    Cheaper than q projection + attention + out projection when L·(H-1) < dim (`folding_pays`): 2·dim·H·L
    multiply-adds a frame instead of 2·dim² + 2·L·dim. The same maths; only the rounding differs."""

    scores: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor


TextEntry = TextKV | FoldedText
CrossKV = list[TextEntry]  # per layer: the text's k/v [B, H, L, D] (or, on the CPU path, folded: `fold_texts`)
# q [N, H, Tq, D], k/v [N, H, Tk, D], band half-width or None (full) -> [N, H, Tq, D]; engine.ops.attention's signature
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "int | None"], torch.Tensor]

Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # x [.., in], weight [out, in] -> [.., out]
# The frames a pass's last layer keeps after self-attention (`Mixing.at_frames`): [N, n] int64 for one request's
# rows (`Dense`), or one such tensor per part of a pack (`Packed`)
Frames = torch.Tensor | Sequence[torch.Tensor]

# Rows of every GEMM of the deterministic linear (`invariant_linear`): a multiple of every microkernel's row tile.
INVARIANT_ROWS = 64


def invariant_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear (no bias) whose rows come out the same bits whatever other rows share the call, by construction: the
    rows go through GEMMs of exactly INVARIANT_ROWS rows each (the last padded with zeros), so the library sees one
    shape, picks one kernel and reduces every row in one order, wherever the row sits and however many there are.
    (A plain GEMM picks its kernel, its tiling and its split of the reduction by the row count: cuBLAS moves an fp16
    logit by ~1e-4 with the batch, MKL's sgemm takes another kernel below 12 rows.) tests/test_determinism.py checks
    it for every row count 1..32 at several offsets, on 1 and 2 threads, in fp32, fp16 and bf16."""
    rows, width = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, width)
    m = flat.shape[0]
    pad = -m % INVARIANT_ROWS
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad, width)])
    if flat.device.type == "cpu" and flat.dtype == torch.float32:
        # the blocks as the items of one batched GEMM, each the same [64, in] x [in, out] product: MKL gives the same
        # bits as a GEMM call per block at ~1.1x one plain GEMM's time (500 rows), where a call per block is ~1.7x
        blocks = flat.view(-1, INVARIANT_ROWS, width)
        wt = weight.t()
        out = torch.bmm(blocks, wt.expand(blocks.shape[0], *wt.shape)).view(-1, weight.shape[0])
    else:  # cuBLAS picks a batched GEMM's kernel by the batch count too: one call per block
        out = torch.cat([F.linear(block, weight) for block in flat.split(INVARIANT_ROWS)])
    return out[:m].reshape(*rows, weight.shape[0])


def invariant_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Deterministic mode's linear on CPU (`LM.invariant_linear`'s default), for x laid out as rows of frames [R, T,
    in] (or flat [M, in]: `invariant_linear`). A row of at least INVARIANT_ROWS frames is one GEMM of its own shape
    [T, in] x [in, out], the items of one batched GEMM; shorter rows, and flat ones, go through `invariant_linear`'s
    blocks. Either way a row's arithmetic is fixed by its own frame count, whatever shares the call: a pass lays out
    each row's frames the same alone or in a pack (`Mixing.project`). A long row's GEMM then costs what a plain one
    does, where 64-row blocks re-pack the weight for each block (+20% at 498 frames)."""
    if x.dim() != 3 or x.shape[1] < INVARIANT_ROWS or x.device.type != "cpu" or x.dtype != torch.float32:
        return invariant_linear(x, weight)
    wt = weight.t()
    return torch.bmm(x.contiguous(), wt.expand(x.shape[0], *wt.shape))


@dataclass
class Rows:
    """One request's share of a packed LM pass (`LM.forward_packed`): its codes [N, K, T] (N = 2B rows [cond;
    uncond] when guided, else B), its codebook stage, and its text k/v (`LM.cross_kv`) for its first B rows."""

    codes: torch.Tensor
    stage: int
    cross: CrossKV

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    @property
    def t(self) -> int:
        return self.codes.shape[-1]

    @property
    def cond_rows(self) -> int:
        return self.cross[0][0].shape[0] if self.cross else 0


def sin_embedding_at(positions: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """audiocraft's sinusoids at positions held in a tensor [T]: [cos | sin] halves, frequencies
    max_period^(-i/(half-1)). A tensor (not an int offset) lets the AR decoder's step counter live on the device,
    so a captured CUDA graph can replay with a new position. -> [1, T, dim] fp32."""
    half = dim // 2
    device = positions.device
    pos = positions.to(torch.float32).view(1, -1, 1)
    adim = torch.arange(half, device=device, dtype=torch.float32).view(1, 1, -1)
    phase = pos / (torch.full([], max_period, device=device, dtype=torch.float32) ** (adim / (half - 1)))
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


class SelfAttention(nn.Module):
    """Packed q|k|v projection without bias. `attend` is the attention op, swapped from outside (set_attention)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.attend: Callable[..., torch.Tensor] = ops.attention


def split_qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, T, 3·dim] packed projections -> q, k, v [N, H, T, D] (features ordered (q|k|v, head, head_dim) as in
    audiocraft)."""
    n, t, three_dim = qkv.shape
    q, k, v = qkv.view(n, t, 3, heads, three_dim // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def merge_heads(o: torch.Tensor) -> torch.Tensor:
    """[N, H, T, D] -> [N, T, H·D]."""
    n, h, t, d = o.shape
    return o.transpose(1, 2).reshape(n, t, h * d)


class CrossAttention(SelfAttention):
    """Same packed weight, split in thirds: q from the frames, k/v from the text (computed once per request)."""

    def kv(self, cond: torch.Tensor) -> TextKV:
        """cond [B, L, dim] -> k, v [B, H, L, D]."""
        b, length, dim = cond.shape
        w = self.in_proj_weight
        shape = (b, length, self.num_heads, dim // self.num_heads)  # explicit D: B may be 0 (all rows null in training)
        k = F.linear(cond, w[dim:2 * dim]).view(shape).transpose(1, 2)
        v = F.linear(cond, w[2 * dim:]).view(shape).transpose(1, 2)
        return TextKV(k, v)

    def kv_rows(self, cond: torch.Tensor) -> TextKV:
        """`kv` with a product of its own per text row (the items of one batched GEMM, k and v together), so a row's
        k/v do not depend on the rows beside it (`fold_texts`)."""
        b, length, dim = cond.shape
        w = self.in_proj_weight[dim:].t()  # [dim, 2·dim]: k | v
        kv = torch.bmm(cond, w.expand(b, *w.shape)).view(b, length, 2, self.num_heads, dim // self.num_heads)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, L, D] each
        return TextKV(k, v)

    def fold(self, kv: TextKV, mask: torch.Tensor) -> FoldedText:
        """k, v [B, H, L, D] -> the same attention folded into the projections (`FoldedText`), computed in fp32 and
        stored in the weights' dtype; `mask` [B, L] fp32: 0, or -inf at padding that takes no softmax weight. A
        product of its own per (text row, head): a row's bits do not depend on the rows folded beside it. Once per
        request."""
        k, v = (t.float() for t in kv)
        b, h, length, d = k.shape
        dim = h * d
        # per head one batched product with an item per text row: the items' layout (contiguous rows of k and v, a
        # contiguous weight read in place for every row), hence their GEMM, is the same alone and beside other rows
        wq = self.in_proj_weight[:dim].float().view(h, d, dim)  # [H, D, dim]: q_h = x @ wq[h]ᵀ
        wo = self.out_proj.weight.float().view(dim, h, d).permute(1, 2, 0).contiguous()  # [H, D, dim]: o_h @ wo[h]
        k = (k * d ** -0.5).contiguous()
        v = v.contiguous()
        scores = torch.stack([torch.bmm(k[:, i], wq[i].expand(b, d, dim)) for i in range(h)], 1)  # [B, H, L, dim]
        values = torch.stack([torch.bmm(v[:, i], wo[i].expand(b, d, dim)) for i in range(h)], 1)  # [B, H, L, dim]
        scores = scores.view(b, h * length, dim)
        values = values.view(b, h * length, dim).transpose(1, 2)  # [B, dim, H·L]
        dtype = self.in_proj_weight.dtype
        return FoldedText(scores.to(dtype).contiguous(), values.to(dtype).contiguous(),
                          mask[:, None].expand(b, h, length).reshape(b, 1, h * length))


class Mixing:
    """How the rows of one LM pass are laid out, which is all a layer needs besides its weights: the linear op
    (plain, or row-invariant when requests share the pass), self-attention over the right keys, and which rows have
    text. The layer maths (`Layer.forward`) exists once; MAGNeT's pass (`Dense`), the AR decoder's KV-cached pass
    (`Cached`) and the scheduler's packed pass (`Packed`) differ only here.

    Dense and Cached hold x as [N, T, dim] with the conditional rows first: the other rows' text is the null
    condition, all-zero embeddings and bias-free projections, so their cross-attention is exactly 0 and is skipped.
    """

    def __init__(self, cross: CrossKV, linear: Linear) -> None:
        self.cross = cross  # per layer: k, v [B, H, L, D] of the conditional rows
        self.linear = linear  # the LM's: F.linear, or its row-invariant linear in deterministic mode

    def project(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The pass's linear over all its rows, h laid out as this mixing says ([N, T, in] here: rows of frames)."""
        return self.linear(h, weight)

    def self_attention(self, layer: int, attn: SelfAttention, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [.., 3·dim] -> attention output [.., dim] before out_proj."""
        raise NotImplementedError

    def at_frames(self, x: torch.Tensor, frames: Frames) -> tuple[torch.Tensor, Mixing]:
        """x's rows at `frames` only, and how those are laid out (the last layer's rows after self-attention:
        `LM.forward`, `LM.forward_packed`)."""
        raise NotImplementedError(f"{type(self).__name__} passes every frame")

    def cond_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """x -> its rows with text (None: there are none)."""
        b = self.cross[0][0].shape[0] if self.cross else 0
        return x[:b] if b else None

    def put_cond_rows(self, x: torch.Tensor, xc: torch.Tensor) -> torch.Tensor:
        b = xc.shape[0]
        return xc if b == x.shape[0] else torch.cat([xc, x[b:]], dim=0)

    def text_attention(self, layer: int, attn: CrossAttention, h: torch.Tensor, lin: Linear) -> torch.Tensor:
        """The cross-attention branch: h [B, T, dim] (the conditional rows, normed) -> [B, T, dim] after out_proj.
        `lin` is the layer's linear (mixed precision: `Layer.forward`)."""
        text = self.cross[layer]
        if isinstance(text, FoldedText):
            return folded_rows(h, text, attn.num_heads, lin, self.linear)
        q = lin(h, attn.in_proj_weight[:h.shape[-1]])
        return lin(self.cross_attention(layer, attn, q), attn.out_proj.weight)

    def cross_attention(self, layer: int, attn: CrossAttention, q: torch.Tensor) -> torch.Tensor:
        """q [B, T, dim] of the conditional rows -> [B, T, dim] before out_proj."""
        k, v = self.cross[layer]
        qh = q.view(q.shape[0], q.shape[1], attn.num_heads, -1).transpose(1, 2)  # [B, H, T, D]
        # no key mask: padded text positions are zero keys that still take softmax weight, as in training
        return merge_heads(attn.attend(qh, k, v, None))


def folded_attention(h: torch.Tensor, text: FoldedText, heads: int, lin: Linear) -> torch.Tensor:
    """One text row's folded cross-attention (`FoldedText` of one row: scores [H·L, dim], values [dim, H·L], mask
    [1, H·L]): h [T, dim] -> [T, dim] after out_proj. Two linears of that row's frames only, so a row gets the same
    bits alone or in a pack (with a row-invariant `lin`, whatever its frame count's neighbours)."""
    s = lin(h, text.scores).float().add_(text.mask)  # [T, H·L] fp32 (a fresh product: masked in place)
    p = torch.softmax(s.view(s.shape[0], heads, -1), dim=-1).view(s.shape)  # per head over L
    return lin(p, text.values)


def folded_rows(h: torch.Tensor, text: FoldedText, heads: int, lin: Linear, linear: Linear) -> torch.Tensor:
    """R text rows' folded cross-attention, each with its own text: h [R, T, dim], text [R, ..] (scores [R, H·L, dim],
    values [R, dim, H·L], mask [R, 1, H·L]) -> [R, T, dim], each row's `folded_attention` (`lin`: the layer's, over
    the pass's `linear`).

    On a CPU in fp32 the R rows go through one batched GEMM per projection instead of R GEMMs each (a row's
    per-row calls cost ~150 µs a layer on the default model: ~14% of a static batch of 16 one-second requests).
    With the row-invariant linear each item is the [64, dim] x [dim, H·L] product that `invariant_linear` computes
    for the row alone (frames zero-padded to INVARIANT_ROWS, the weight read transposed in place): the same GEMM, so
    the same bits, as its solo pass, which takes the per-row path (one row). Rows of more frames than one block,
    other dtypes and other linears take the per-row path. There a row of more frames than one block runs plain
    GEMMs even with the row-invariant linear: their shape is the row's own (its frames, its text) alone or in a pack,
    so they give it the same bits either way, without the blocks' cost (+56–100% on these thin GEMMs)."""
    r, t, dim = h.shape
    plain = linear is F.linear
    blocks = linear in (invariant_linear, invariant_rows)  # the CPU's row-invariant construction
    if r == 1 or h.device.type != "cpu" or text.scores.dtype != torch.float32 or not (
            plain or (blocks and t <= INVARIANT_ROWS)):
        if blocks and t > INVARIANT_ROWS and h.device.type == "cpu":
            def lin(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                return F.linear(x.to(w.dtype), w)
        outs = [folded_attention(h[b], FoldedText(*(x[b] for x in text)), heads, lin) for b in range(r)]
        return outs[0].unsqueeze(0) if r == 1 else torch.stack(outs)

    def rows_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # [R, T, in] x [R, out, in] -> [R, T, out]
        if plain:
            return torch.bmm(x, w.transpose(1, 2))
        padded = x.new_zeros(r, INVARIANT_ROWS, x.shape[-1])
        padded[:, :t] = x
        return torch.bmm(padded, w.transpose(1, 2))[:, :t]

    s = rows_linear(h.float(), text.scores).add_(text.mask)  # [R, T, H·L]
    p = torch.softmax(s.view(r, t, heads, -1), dim=-1).view(s.shape)  # per head over L
    return rows_linear(p, text.values)


def folding_pays(length: int, heads: int, dim: int) -> bool:
    """Whether a text of `length` tokens is cheaper folded (`FoldedText`): dim·H·L < dim² + L·dim multiply-adds a
    frame, i.e. L·(H-1) < dim (the default model, dim 256 and 4 heads: under 86 tokens)."""
    return length * (heads - 1) < dim


# Most memory a request's folded text may hold (all layers). Folded text is H times its k/v, kept for the whole
# request: the default model's is ~0.3 MiB, but the medium model's (48 layers, 24 heads) ~280 MiB at 20 tokens, per
# request, for a gain lost in its GEMMs; above the budget the text stays k/v.
FOLD_MAX_BYTES = 16 << 20


# Deterministic mode folds each text padded to a multiple of TEXT_QUANTUM tokens (masked: `FoldedText`), so requests
# whose texts differ by a few tokens have one shape and share one batched product in a pack, as a static batch's
# texts padded to its longest do; each row's shape, hence its bits, is still the one it computes alone.
TEXT_QUANTUM = 8


def folded_length(lm: LM, cond: torch.Tensor) -> int | None:
    """The length text embeddings cond [B, L, dim] are folded at (`fold_texts`): L, in deterministic mode rounded up
    to a multiple of TEXT_QUANTUM. None where the text stays k/v: off the CPU, where folding does not pay at that
    length (`folding_pays`), would hold more than FOLD_MAX_BYTES, or a layer runs a swapped attention op (e.g. a
    Triton kernel, used as given)."""
    rows, length, dim = cond.shape
    heads = lm.cfg.num_heads
    length += -length % (TEXT_QUANTUM if lm.deterministic else 1)
    itemsize = lm.layers[0].cross_attention.in_proj_weight.element_size()
    folded_bytes = len(lm.layers) * 2 * rows * heads * length * dim * itemsize  # scores and values, every layer
    if cond.device.type != "cpu" or not folding_pays(length, heads, dim) or folded_bytes > FOLD_MAX_BYTES or any(
            layer.cross_attention.attend is not ops.attention for layer in lm.layers):
        return None
    return length


def fold_texts(lm: LM, conds: Sequence[torch.Tensor], length: int) -> list[CrossKV]:
    """Requests' text embeddings conds [B_i, L_i, dim] (L_i <= length) -> each one's every layer folded at `length`
    tokens (`FoldedText`: zero-padded under a -inf mask), all of them in one batched product per projection with an
    item of its own per text row (`CrossAttention.kv_rows`, `fold`), so each row's bits are those it gets folded
    alone (a request's text at its start, in the scheduler's bursts or alone)."""
    rows = [c.shape[0] for c in conds]
    dim = lm.cfg.dim
    cond = conds[0].new_zeros(sum(rows), length, dim, dtype=lm.dtype)  # [ΣB, L, dim]
    mask = conds[0].new_zeros(sum(rows), length, dtype=torch.float32)  # [ΣB, L]
    starts = [sum(rows[:i]) for i in range(len(rows) + 1)]
    for c, r in zip(conds, starts):
        cond[r:r + c.shape[0], :c.shape[1]] = c
        mask[r:r + c.shape[0], c.shape[1]:] = float("-inf")
    folded = [layer.cross_attention.fold(layer.cross_attention.kv_rows(cond), mask) for layer in lm.layers]
    return [[FoldedText(*(x[a:b] for x in text)) for text in folded] for a, b in zip(starts, starts[1:])]


class Dense(Mixing):
    """One request's MAGNeT pass: x [N, T, dim], self-attention full or banded (`window`)."""

    def __init__(self, cross: CrossKV, window: int | None, linear: Linear = F.linear) -> None:
        super().__init__(cross, linear)
        self.window = window

    def self_attention(self, layer: int, attn: SelfAttention, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = split_qkv(qkv, attn.num_heads)
        return merge_heads(attn.attend(q, k, v, self.window))

    def at_frames(self, x: torch.Tensor, frames: Frames) -> tuple[torch.Tensor, Mixing]:
        """x [N, T, dim] -> [N, n, dim] at frames [N, n]; the layout is the same."""
        assert isinstance(frames, torch.Tensor)
        n, t, dim = x.shape
        return x.reshape(n * t, dim).index_select(0, frame_rows(frames, t)).view(*frames.shape, dim), self


def frame_rows(frames: torch.Tensor, t: int, start: int = 0) -> torch.Tensor:
    """frames [N, n] of N rows of t frames each, laid out from row `start` of a flat [.., dim] matrix -> their row
    indices there [N·n]."""
    return (frames + torch.arange(start, start + frames.shape[0] * t, t, device=frames.device)[:, None]).flatten()


class Cached(Mixing):
    """The AR decoder's pass against a static KV cache (MusicGen, the rescorer): x [N, n, dim] holds the frames at
    positions `index` [n] (int64 on the device); their k/v are written into each layer's cache [N, H, T_max, D] in
    place, then the queries attend to the whole cache under `mask` [n, T_max] (key position <= query position), so
    shapes never depend on the step."""

    def __init__(self, cross: CrossKV, caches: Sequence[tuple[torch.Tensor, torch.Tensor]], index: torch.Tensor,
                 mask: torch.Tensor, linear: Linear = F.linear) -> None:
        super().__init__(cross, linear)
        self.caches, self.index, self.mask = caches, index, mask

    def self_attention(self, layer: int, attn: SelfAttention, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = split_qkv(qkv, attn.num_heads)
        cache_k, cache_v = self.caches[layer]
        cache_k.index_copy_(2, self.index, k.to(cache_k.dtype))
        cache_v.index_copy_(2, self.index, v.to(cache_v.dtype))
        return merge_heads(F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=self.mask))


class Packed(Mixing):
    """Several requests in one pass (`LM.forward_packed`), each at its own stage, length and text: x [ΣN·T, dim].
    Linears run on the whole pack (each row's output its own pass's when the linear is row-invariant); attention
    runs per request over its own rows, frames and text (no padded key but its own text's masked padding, no other
    request's key).

    Neighbours in the pack with the same frames and attention window (and, for cross-attention, the same text
    length; folded, the same padded length) share one attention call, batched along N: attention computes each
    (row, head) alone, so a request's output is its own call's bit for bit (tests/test_scheduler.py), and a batch of
    B one-request parts costs one call per layer, as a static batch's pass does, not B."""

    def __init__(self, parts: Sequence[Rows], windows: Sequence[int | None], device: torch.device,
                 linear: Linear, widths: Sequence[int] | None = None, joined: JoinedTexts | None = None) -> None:
        super().__init__([], linear)
        self.parts, self.windows, self.device = parts, windows, device
        self.joined = JoinedTexts() if joined is None else joined
        self.widths = [p.t for p in parts] if widths is None else list(widths)  # frames of each part's rows
        self.sizes = [p.n * t for p, t in zip(parts, self.widths)]
        self.starts = [sum(self.sizes[:i]) for i in range(len(parts) + 1)]
        self.spans = row_spans(self.sizes, self.widths)  # runs of equal frames, for `project`
        self.self_runs = runs([(t, w) for t, w in zip(self.widths, windows)])
        cond = [i for i, p in enumerate(parts) if p.cond_rows]
        self.cond_parts = [parts[i] for i in cond]
        self.cond_widths = [self.widths[i] for i in cond]
        self.cond_sizes = [p.cond_rows * t for p, t in zip(self.cond_parts, self.cond_widths)]
        self.cond_starts = [sum(self.cond_sizes[:i]) for i in range(len(self.cond_parts) + 1)]
        self.cross_runs = runs([(t, type(p.cross[0]), p.cross[0][0].shape[1:])
                                for p, t in zip(self.cond_parts, self.cond_widths)])
        self.all_cond = all(p.cond_rows == p.n for p in parts)  # unguided: every row has text, no gather
        # the pack's row indices of every request's conditional rows, in order: made on the device (a host tensor
        # would be a copy and a sync per pass, and illegal inside a CUDA graph capture)
        self.cond_index = None if self.all_cond else torch.cat(
            [torch.arange(s, s + p.cond_rows * t, device=device) for s, p, t in zip(self.starts, parts, self.widths)])

    def at_frames(self, x: torch.Tensor, frames: Frames) -> tuple[torch.Tensor, Mixing]:
        """x [ΣN·T, dim] -> [ΣN·n, dim]: each part's rows at its frames [N, n] (one per part, in order), laid out
        as a pack of those widths."""
        assert not isinstance(frames, torch.Tensor) and len(frames) == len(self.parts)
        flat = torch.cat([frame_rows(f, t, s) for f, s, t in zip(frames, self.starts, self.widths)])
        narrowed = Packed(self.parts, self.windows, self.device, self.linear, [f.shape[1] for f in frames],
                          self.joined)
        return x.index_select(0, flat), narrowed

    def project(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """h [ΣN·T, in] -> [ΣN·T, out]: with a row-invariant linear, each run of parts of equal frames as rows of
        frames [n, T, in] (`invariant_rows`: the layout a request's own pass gives its rows)."""
        return linear_rows(self.linear, h, weight, self.spans)

    def self_attention(self, layer: int, attn: SelfAttention, qkv: torch.Tensor) -> torch.Tensor:
        outs = []
        for i, j in self.self_runs:
            n, t = sum(p.n for p in self.parts[i:j]), self.widths[i]
            piece = qkv[self.starts[i]:self.starts[j]]
            q, k, v = split_qkv(piece.view(n, t, -1), attn.num_heads)  # [N, H, T, D] each
            outs.append(merge_heads(attn.attend(q, k, v, self.windows[i])).reshape(n * t, -1))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def cond_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.all_cond:
            return x
        return x.index_select(0, self.cond_index) if self.cond_parts else None  # [ΣB·T, dim]

    def put_cond_rows(self, x: torch.Tensor, xc: torch.Tensor) -> torch.Tensor:
        return xc if self.all_cond else x.index_copy(0, self.cond_index, xc)

    def text_attention(self, layer: int, attn: CrossAttention, h: torch.Tensor, lin: Linear) -> torch.Tensor:
        """h [ΣB·T, dim] (every request's conditional rows, normed) -> [ΣB·T, dim], per run of neighbours: folded
        texts row by row (`folded_attention`), others by q projection, one attention call and out projection."""
        outs = []
        for i, j in self.cross_runs:
            group = self.cond_parts[i:j]
            b, t = sum(p.cond_rows for p in group), self.cond_widths[i]
            hg = h[self.cond_starts[i]:self.cond_starts[j]]
            if isinstance(group[0].cross[layer], FoldedText):
                text = self.joined.join([p.cross[layer] for p in group])
                outs.append(folded_rows(hg.view(b, t, -1), text, attn.num_heads, lin, self.linear).reshape(b * t, -1))
                continue
            k, v = group[0].cross[layer]
            if len(group) > 1:
                k, v = (torch.cat([p.cross[layer][m] for p in group]) for m in (0, 1))
            qh = lin(hg.view(b, t, -1), attn.in_proj_weight[:hg.shape[-1]]).view(b, t, attn.num_heads, -1)
            o = merge_heads(attn.attend(qh.transpose(1, 2), k, v, None))  # [B, H, T, D] -> [B, T, dim]
            outs.append(lin(o, attn.out_proj.weight).reshape(b * t, -1))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class JoinedTexts:
    """The folded texts of a pack's runs (`Packed.text_attention`), each run's concatenated along B once and kept
    from pass to pass while the run keeps its requests, as a cohort in lockstep does for all its passes (a
    concatenation per run, layer and pass was ~2% of a burst of 16 one-second requests). A request's text never
    changes while it decodes."""

    def __init__(self) -> None:
        # run key -> (its texts, held so that no id in the key is reused while kept; their concatenation)
        self.kept: dict[tuple[int, ...], tuple[list[FoldedText], FoldedText]] = {}
        self.used: set[tuple[int, ...]] = set()

    def join(self, texts: list[FoldedText]) -> FoldedText:
        """Texts [1, ..] or [B_i, ..] each -> one FoldedText of all their rows, in order."""
        if len(texts) == 1:
            return texts[0]
        key = tuple(id(t.scores) for t in texts)
        if key not in self.kept:
            self.kept[key] = (texts, FoldedText(*(torch.cat(x) for x in zip(*texts))))
        self.used.add(key)
        return self.kept[key][1]

    def end_pass(self) -> None:
        """Let go of the runs the last pass did not use (a request left or joined, a run split)."""
        self.kept = {k: v for k, v in self.kept.items() if k in self.used}
        self.used = set()


def row_spans(sizes: Sequence[int], widths: Sequence[int]) -> list[tuple[int, int, int]]:
    """Parts of sizes[i] = n_i·widths[i] rows (n_i rows of widths[i] frames), in order -> (start, stop, frames) of
    each run of parts of equal widths (`linear_rows`)."""
    spans, start = [], 0
    for i, j in runs(widths):
        stop = start + sum(sizes[i:j])
        spans.append((start, stop, widths[i]))
        start = stop
    return spans


def linear_rows(linear: Linear, x: torch.Tensor, weight: torch.Tensor,
                spans: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """x [ΣM, in] laid out in `spans` (`row_spans`) -> [ΣM, out]: `invariant_rows` on each span as [n, T, in] (rows
    of frames: a long row gets a GEMM of its own shape), any other linear on all of it."""
    if linear is not invariant_rows:  # any other linear sees rows alike wherever their frames are
        return linear(x, weight)
    outs = []
    for start, stop, t in spans:
        m = stop - start
        rows = x[start:stop].reshape(m // t if t else 0, t, x.shape[-1])
        outs.append(linear(rows, weight).reshape(m, weight.shape[0]))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def runs(keys: Sequence[object]) -> list[tuple[int, int]]:
    """[start, stop) index ranges of neighbours with equal keys, in order: [a, a, b, a] -> [(0, 2), (2, 3), (3, 4)]."""
    out: list[tuple[int, int]] = []
    for i, key in enumerate(keys):
        if out and keys[out[-1][0]] == key:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.self_attn = SelfAttention(d, cfg.num_heads)
        self.cross_attention = CrossAttention(d, cfg.num_heads)
        self.linear1 = nn.Linear(d, cfg.ffn_dim, bias=False)
        self.linear2 = nn.Linear(cfg.ffn_dim, d, bias=False)
        self.norm1 = nn.LayerNorm(d, eps=1e-5)
        self.norm_cross = nn.LayerNorm(d, eps=1e-5)
        self.norm2 = nn.LayerNorm(d, eps=1e-5)

    def forward(self, x: torch.Tensor, mix: Mixing, index: int, frames: Frames | None = None) -> torch.Tensor:
        """Pre-LN self-attention, cross-attention to the text (rows with text only), GELU MLP. x [.., dim] fp32, laid
        out as `mix` says; `index`: this layer's place in the stack (its text k/v, its KV cache). `frames`: after
        self-attention only those frames go on (`Mixing.at_frames`; the rest is row-local).

        Mixed precision as the reference's autocast: the matmuls and attention in the weights' dtype, the residual
        stream and the norms in fp32 (a half-precision branch added to it promotes to fp32)."""
        sa, ca = self.self_attn, self.cross_attention

        def lin(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # h: rows of frames [R, T, in], or flat
            return mix.linear(h.to(w.dtype), w)

        def proj(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # h: all the pass's rows, laid out as `mix` says
            return mix.project(h.to(w.dtype), w)

        x = x + proj(mix.self_attention(index, sa, proj(self.norm1(x), sa.in_proj_weight)), sa.out_proj.weight)
        if frames is not None:
            x, mix = mix.at_frames(x, frames)  # `lin` and `proj` read `mix` when called: the narrowed layout's
        xc = mix.cond_rows(x)
        if xc is not None:
            x = mix.put_cond_rows(x, xc + mix.text_attention(index, ca, self.norm_cross(xc), lin))
        return x + proj(F.gelu(proj(self.norm2(x), self.linear1.weight)), self.linear2.weight)


class LM(nn.Module):
    """MAGNeT / MusicGen language model. Weights in any dtype; embeddings, final norm and heads stay fp32."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.emb = nn.ModuleList([nn.Embedding(cfg.card + 1, cfg.dim) for _ in range(cfg.n_q)])
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList([Layer(cfg) for _ in range(cfg.num_layers)])
        self.out_norm = nn.LayerNorm(cfg.dim, eps=1e-5)
        self.linears = nn.ModuleList([nn.Linear(cfg.dim, cfg.card, bias=False) for _ in range(cfg.n_q)])
        self.text_proj = nn.Linear(cfg.text_dim, cfg.dim, bias=True)
        self.linear: Linear = F.linear  # every projection of a pass and the heads (`set_deterministic`)
        # the row-invariant linear deterministic mode runs (`set_invariant_linear`: a backend's own, e.g. Triton's)
        self.invariant_linear: Linear = invariant_rows

    def set_deterministic(self, on: bool) -> LM:
        """Row-invariant linears (`self.invariant_linear`): a row's logits do not depend on what else shares its
        pass, so a request's tokens are its solo run's in any batch and on any thread count. The rest of a pass is
        already row-local (norms, attention per request, the sampler per position)."""
        self.linear = self.invariant_linear if on else F.linear
        return self

    def set_invariant_linear(self, op: Linear) -> LM:
        """The row-invariant linear deterministic mode uses, swapped from outside (`kernels.backend.apply`: the
        fixed-tile Triton GEMM on CUDA); `op` must give each row the same bits whatever shares the call. A
        deterministic LM switches at once; a plain one uses it when `set_deterministic(True)` comes."""
        if op is F.linear:
            raise ValueError("F.linear is not row-invariant (the library picks its kernel by row count); pass a "
                             "fixed-tile linear such as engine.model.invariant_linear")
        on = self.deterministic
        self.invariant_linear = op
        return self.set_deterministic(on)

    @property
    def deterministic(self) -> bool:
        return self.linear is self.invariant_linear

    @property
    def layers(self) -> nn.ModuleList:
        return self.transformer.layers

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].linear1.weight.dtype

    def to_dtype(self, dtype: torch.dtype) -> LM:
        """The layers' matmul weights in `dtype`; everything else in fp32: embeddings, text projection, final norm
        and heads (as audiocraft builds them, so guidance and sampling never see half-precision logits) and the
        layers' norms, which the reference's autocast runs in fp32 (the residual stream stays fp32: Layer.forward)."""
        self.float()
        for layer in self.layers:
            for module in (layer.self_attn, layer.cross_attention, layer.linear1, layer.linear2):
                module.to(dtype)
        return self

    def cross_kv(self, cond: torch.Tensor) -> CrossKV:
        """Text embeddings [B, L, dim] (after `text_proj`, padding zeroed) -> per-layer k, v. Once per request."""
        cond = cond.to(self.dtype)
        return [layer.cross_attention.kv(cond) for layer in self.layers]

    def embed(self, codes: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """codes [N, K, T] -> [N, T, dim] fp32: Σ_k emb[k] (in codebook order, as the reference sums) + positions."""
        return self.embed_at(codes, torch.arange(offset, offset + codes.shape[-1], device=codes.device))

    def embed_at(self, codes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`embed` with positions as a device tensor [T] (the AR decoder's streaming offset). -> [N, T, dim] fp32."""
        x = self.emb[0](codes[:, 0])
        for k in range(1, self.cfg.n_q):
            x = x + self.emb[k](codes[:, k])
        return x + sin_embedding_at(positions, self.cfg.dim)

    def head(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """[N, T, dim] -> logits [N, T, V] fp32 of one codebook: generation never needs the others."""
        return self.linear(self.out_norm(x.float()), self.linears[stage].weight)

    def hidden(self, x: torch.Tensor, mix: Mixing, frames: Frames | None = None) -> torch.Tensor:
        """Embedded rows x (laid out as `mix` says) through every layer; `frames`: only those frames out of the last
        layer (`Layer.forward`)."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, mix, i, frames if i == last else None)
        return x

    def forward(self, codes: torch.Tensor, stage: int, cross: CrossKV, frames: torch.Tensor | None = None
                ) -> torch.Tensor:
        """MAGNeT pass: codes [N, K, T] (mask token = card), stage s -> logits of codebook s [N, T, V] fp32, or
        [N, n, V] at `frames` [N, n] (int64, per row).

        Self-attention is full for s = 0 and banded |Δt| <= subcodes_context for s >= 1. `cross` holds k/v for
        the first B rows; rows past B are the unconditional half. With `frames`, the last layer's cross-attention,
        MLP and the head run on those frames only (all of it is row-local: a frame's logits are the full pass's, up
        to the GEMMs' rounding of fewer rows; bit for bit with a row-invariant linear).
        """
        x = self.hidden(self.embed(codes), Dense(cross, self.cfg.window(stage), self.linear), frames)
        return self.head(x, stage)

    def forward_cached(self, tokens: torch.Tensor, index: torch.Tensor, cross: CrossKV,
                       caches: Sequence[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> torch.Tensor:
        """The AR decoder's pass: tokens [B, K, n] at positions `index` [n], the same rows under both conditions
        ([cond; uncond] = 2B rows; k/v written into `caches`, attended under `mask`: see `Cached`) -> hidden
        states [2B, n, dim]."""
        x = self.embed_at(tokens, index)  # [B, n, dim] fp32
        return self.hidden(torch.cat([x, x]), Cached(cross, caches, index, mask, self.linear))

    def forward_packed(self, parts: Sequence[Rows], frames: Sequence[torch.Tensor] | None = None,
                       joined: JoinedTexts | None = None) -> list[torch.Tensor]:
        """One MAGNeT pass over several requests, each at its own stage, length and text: -> per request the
        logits [N, T, V] fp32 that `forward(part.codes, part.stage, part.cross)` gives, bit for bit; with `frames`
        (per part [N, n]) the logits [N, n, V] that `forward(..., frames=its frames)` gives.

        Batch invariance (with `set_deterministic`): the requests are packed along the rows of one [ΣN·T, dim]
        matrix, not padded to a common T or L, so row-invariant linears give each row its own pass's bits, and
        attention runs per request over exactly its own keys (padded keys, even masked, change softmax sums by
        ~1e-7; a folded text's padding to the quantum, `fold_texts`, is its solo pass's too). Without it the pack's
        GEMMs may round a row differently from its own pass's (by ~1e-5).
        `joined`: the caller's folded texts kept across its passes (`JoinedTexts`).
        """
        dim = self.cfg.dim
        mix = Packed(parts, [self.cfg.window(p.stage) for p in parts], self.out_norm.weight.device, self.linear,
                     joined=joined)
        # neighbours of equal frames embedded at once (the embedding is row-local)
        xs = [self.embed(torch.cat([p.codes for p in parts[i:j]])).reshape(-1, dim)
              for i, j in runs([p.t for p in parts])]
        x = xs[0] if len(xs) == 1 else torch.cat(xs)  # [ΣN·T, dim] fp32
        h = self.out_norm(self.hidden(x, mix, frames).float())  # [ΣN·n, dim]
        widths = [p.t for p in parts] if frames is None else [f.shape[1] for f in frames]
        all_sizes = [p.n * t for p, t in zip(parts, widths)]
        y = h.split(all_sizes)
        logits: list[torch.Tensor | None] = [None] * len(parts)
        for stage in sorted({p.stage for p in parts}):  # one head GEMM per codebook among the requests
            idx = [i for i, p in enumerate(parts) if p.stage == stage]
            sizes = [all_sizes[i] for i in idx]
            rows = h if len(idx) == len(parts) else torch.cat([y[i] for i in idx])
            out = linear_rows(self.linear, rows, self.linears[stage].weight,
                              row_spans(sizes, [widths[i] for i in idx]))
            for i, o in zip(idx, out.split(sizes)):
                logits[i] = o.view(parts[i].n, widths[i], -1)
        mix.joined.end_pass()
        return logits  # type: ignore[return-value]


def set_attention(lm: LM, self_op: Attend | None = None, cross_op: Attend | None = None
                  ) -> list[tuple[Attend, Attend]]:
    """The one way to swap the LM's attention ops (Triton kernels, the ONNX graphs' masked op, training's switch):
    every layer's self-attention op becomes `self_op` and cross-attention op `cross_op` (None keeps it). Returns the
    previous ops, for `restore_attention`."""
    saved = [(layer.self_attn.attend, layer.cross_attention.attend) for layer in lm.layers]
    for layer in lm.layers:
        if self_op is not None:
            layer.self_attn.attend = self_op
        if cross_op is not None:
            layer.cross_attention.attend = cross_op
    return saved


def restore_attention(lm: LM, saved: list[tuple[Attend, Attend]]) -> None:
    for layer, (self_op, cross_op) in zip(lm.layers, saved):
        layer.self_attn.attend, layer.cross_attention.attend = self_op, cross_op


@contextlib.contextmanager
def attention_ops(lm: LM, self_op: Attend | None = None, cross_op: Attend | None = None) -> Iterator[None]:
    """`set_attention` for the duration of a `with` block; the previous ops are restored on exit."""
    saved = set_attention(lm, self_op, cross_op)
    try:
        yield
    finally:
        restore_attention(lm, saved)
