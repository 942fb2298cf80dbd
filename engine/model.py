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

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import ModelConfig

CrossKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: k, v [B, H, L, D]
# q [N, H, Tq, D], k/v [N, H, Tk, D], band half-width or None (full) -> [N, H, Tq, D]; engine.ops.attention's signature
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "int | None"], torch.Tensor]

# Batch invariance of the packed pass (LM.forward_packed), measured with torch 2.13 (MKL sgemm) on this 2-core AMD
# EPYC: F.linear gives a row's output bit for bit whatever rows are stacked around it once the matrix it sits in
# has >= 12 rows; a call of 1-3, 5-7 or 9-11 rows takes another kernel (max difference 4e-5). So a request whose
# own pass is that small gets its own call, as alone (GEMM_MIN_ROWS). tests/test_scheduler.py checks the whole pass.
GEMM_MIN_ROWS = 12


def packed_linear(x: torch.Tensor, weight: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """F.linear (no bias) of rows [M, in] packed from pieces of `sizes` rows, each piece's output equal to its own
    call: one GEMM over all pieces of >= GEMM_MIN_ROWS rows, one call each for the smaller ones."""
    if min(sizes) >= GEMM_MIN_ROWS:
        return F.linear(x, weight)
    pieces = x.split(list(sizes))
    big = [p for p in pieces if p.shape[0] >= GEMM_MIN_ROWS]
    big_out = iter(F.linear(torch.cat(big), weight).split([p.shape[0] for p in big]) if big else ())
    return torch.cat([next(big_out) if p.shape[0] >= GEMM_MIN_ROWS else F.linear(p, weight) for p in pieces])


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
    """Packed q|k|v projection without bias. `attend` is the attention op, swapped from outside (kernels.apply)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.attend: Callable[..., torch.Tensor] = ops.attention

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[N, T, dim] -> q, k, v [N, H, T, D] (features ordered (q|k|v, head, head_dim) as in audiocraft)."""
        n, t, dim = x.shape
        qkv = F.linear(x, self.in_proj_weight).view(n, t, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        """[N, H, T, D] -> out_proj([N, T, H·D])."""
        n, h, t, d = o.shape
        return self.out_proj(o.transpose(1, 2).reshape(n, t, h * d))

    def forward(self, x: torch.Tensor, window: int | None) -> torch.Tensor:
        q, k, v = self.qkv(x)
        return self.merge(self.attend(q, k, v, window))

    def forward_cached(self, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, index: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
        """Causal attention against a static KV cache (MusicGen's AR path; MAGNeT never calls this).

        x [N, n, dim] holds the frames at positions `index` [n] (int64, on the device); their k/v are written into
        cache_k / cache_v [N, H, T_max, D] in place, then the queries attend to the whole cache under `mask`
        [n, T_max] bool (key position <= query position), so shapes never depend on the step.
        """
        q, k, v = self.qkv(x)
        cache_k.index_copy_(2, index, k.to(cache_k.dtype))
        cache_v.index_copy_(2, index, v.to(cache_v.dtype))
        return self.merge(F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=mask))


class CrossAttention(SelfAttention):
    """Same packed weight, split in thirds: q from the frames, k/v from the text (computed once per request)."""

    def kv(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cond [B, L, dim] -> k, v [B, H, L, D]."""
        b, length, dim = cond.shape
        w = self.in_proj_weight
        shape = (b, length, self.num_heads, dim // self.num_heads)  # explicit D: B may be 0 (all rows null in training)
        k = F.linear(cond, w[dim:2 * dim]).view(shape).transpose(1, 2)
        v = F.linear(cond, w[2 * dim:]).view(shape).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n, t, dim = x.shape
        q = F.linear(x, self.in_proj_weight[:dim]).view(n, t, self.num_heads, -1).transpose(1, 2)
        # no key mask: padded text positions are zero keys that still take softmax weight, as in training
        return self.merge(self.attend(q, k, v, None))


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

    def forward(self, x: torch.Tensor, window: int | None, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [N, T, dim]; kv for the first B <= N rows (the conditional half). The other rows' text is the null
        condition, all-zero embeddings and bias-free projections: their cross-attention is exactly 0, so skip it."""
        x = x + self.self_attn(self.norm1(x), window)
        x = self.cross(x, kv)
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))

    def forward_cached(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], cache_k: torch.Tensor,
                       cache_v: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`forward` with causal self-attention over a static KV cache (see `SelfAttention.forward_cached`)."""
        x = x + self.self_attn.forward_cached(self.norm1(x), cache_k, cache_v, index, mask)
        x = self.cross(x, kv)
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))

    def forward_packed(self, x: torch.Tensor, parts: Sequence[Rows], layer: int, windows: Sequence[int | None],
                       cond_index: torch.Tensor) -> torch.Tensor:
        """`forward` for several requests packed along the rows: x [ΣN·T, dim]. Linears, norms and the MLP run
        on the whole pack; attention runs per request over its own rows, frames and text (no padded key, no
        other request's key); every op matches `forward` on that request alone, bit for bit (see GEMM_MIN_ROWS).
        cond_index: the pack's row indices of every request's conditional rows, in order."""
        sa, ca = self.self_attn, self.cross_attention
        h, d = sa.num_heads, x.shape[-1] // sa.num_heads
        sizes = [p.n * p.t for p in parts]
        qkv = packed_linear(self.norm1(x), sa.in_proj_weight, sizes)  # [M, 3·dim]
        outs = []
        for piece, p, window in zip(qkv.split(sizes), parts, windows):
            q, k, v = piece.view(p.n, p.t, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # [N, H, T, D] each
            outs.append(sa.attend(q, k, v, window).transpose(1, 2).reshape(p.n * p.t, h * d))
        x = x + packed_linear(torch.cat(outs), sa.out_proj.weight, sizes)
        cond_parts = [p for p in parts if p.cond_rows]
        if cond_parts:  # cross-attention on the conditional rows only (the null text's is exactly 0, see forward)
            csizes = [p.cond_rows * p.t for p in cond_parts]
            xc = x.index_select(0, cond_index)  # [ΣB·T, dim]
            q_all = packed_linear(self.norm_cross(xc), ca.in_proj_weight[:x.shape[-1]], csizes)
            outs = []
            for piece, p in zip(q_all.split(csizes), cond_parts):
                q = piece.view(p.cond_rows, p.t, h, d).transpose(1, 2)  # [B, H, T, D]
                k, v = p.cross[layer]
                outs.append(ca.attend(q, k, v, None).transpose(1, 2).reshape(p.cond_rows * p.t, h * d))
            xc = xc + packed_linear(torch.cat(outs), ca.out_proj.weight, csizes)
            x = x.index_copy(0, cond_index, xc)
        ffn = packed_linear(F.gelu(packed_linear(self.norm2(x), self.linear1.weight, sizes)), self.linear2.weight,
                            sizes)
        return x + ffn

    def cross(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b = kv[0].shape[0]
        if b == 0:
            return x
        h = x[:b] + self.cross_attention(self.norm_cross(x[:b]), *kv)
        return h if b == x.shape[0] else torch.cat([h, x[b:]], dim=0)


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

    @property
    def layers(self) -> nn.ModuleList:
        return self.transformer.layers

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].linear1.weight.dtype

    def to_dtype(self, dtype: torch.dtype) -> LM:
        """Transformer layers in `dtype`; embeddings, text projection, final norm and heads in fp32 (as audiocraft
        builds them), so guidance and sampling never see fp16 logits."""
        self.float()
        self.layers.to(dtype)
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
        return self.linears[stage](self.out_norm(x.float()))

    def forward(self, codes: torch.Tensor, stage: int, cross: CrossKV) -> torch.Tensor:
        """MAGNeT pass: codes [N, K, T] (mask token = card), stage s -> logits of codebook s [N, T, V] fp32.

        Self-attention is full for s = 0 and banded |Δt| <= subcodes_context for s >= 1. `cross` holds k/v for
        the first B rows; rows past B are the unconditional half.
        """
        window = self.cfg.window(stage)
        x = self.embed(codes).to(self.dtype)
        for layer, kv in zip(self.layers, cross):
            x = layer(x, window, kv)
        return self.head(x, stage)

    def forward_packed(self, parts: Sequence[Rows]) -> list[torch.Tensor]:
        """One MAGNeT pass over several requests, each at its own stage, length and text: -> per request the
        logits [N, T, V] fp32 that `forward(part.codes, part.stage, part.cross)` gives, bit for bit.

        Batch invariance: the requests are packed along the rows of one [ΣN·T, dim] matrix, not padded to a common
        T or L, so the linear layers see each row's own elements in the same order (GEMM_MIN_ROWS), and attention
        runs per request over exactly its own keys (padded keys, even masked, change softmax sums by ~1e-7).
        """
        dim = self.cfg.dim
        sizes = [p.n * p.t for p in parts]
        x = torch.cat([self.embed(p.codes).to(self.dtype).reshape(-1, dim) for p in parts])  # [ΣN·T, dim]
        starts = torch.tensor([0] + sizes[:-1]).cumsum(0).tolist()
        cond_index = torch.cat([torch.arange(s, s + p.cond_rows * p.t) for s, p in zip(starts, parts)]).to(x.device)
        windows = [self.cfg.window(p.stage) for p in parts]
        for i, layer in enumerate(self.layers):
            x = layer.forward_packed(x, parts, i, windows, cond_index)
        y = self.out_norm(x.float()).split(sizes)
        logits: list[torch.Tensor | None] = [None] * len(parts)
        for stage in sorted({p.stage for p in parts}):  # one head GEMM per codebook among the requests
            idx = [i for i, p in enumerate(parts) if p.stage == stage]
            out = packed_linear(torch.cat([y[i] for i in idx]), self.linears[stage].weight, [sizes[i] for i in idx])
            for i, o in zip(idx, out.split([sizes[i] for i in idx])):
                logits[i] = o.view(parts[i].n, parts[i].t, -1)
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
