"""A BERT text encoder in plain PyTorch (the default model's MiniLM), so that loading it never imports transformers.

transformers' modelling code pulls in torch._dynamo and torch.distributed on import: 2-3 s of a 10 s generation's
whole process on a 2-core CPU, for a 6-layer encoder that runs once per prompt. This module reads the same folder
(config.json, model.safetensors, tokenizer.json) and computes what `transformers.BertModel` computes, op for op
(tests/test_text.py checks it against transformers); T5 and other encoders still load through transformers.

    input_ids [B, L] ─ word + token-type(0) + position embeddings ─ LN ─ layers × (self-attn ─ +, LN ─ GELU MLP ─ +, LN)
    -> last_hidden_state [B, L, dim]
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@dataclass(frozen=True)
class BertConfig:
    model_type = "bert"  # a class constant, as transformers' configs name their family
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def read(cls, folder: Path) -> BertConfig:
        """config.json of a transformers BERT folder; refuses what this module does not compute."""
        raw = json.loads((folder / "config.json").read_text())
        for key, want in (("model_type", "bert"), ("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
            if raw.get(key, want) != want:
                raise ValueError(f"{folder}/config.json: {key}={raw.get(key)!r}, this BERT encoder needs {want!r}")
        return cls(**{name: raw[name] for name in cls.__dataclass_fields__})


def is_bert(folder: Path) -> bool:
    """A local BERT folder this module reads (weights as safetensors, a fast tokenizer file)."""
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    return model_type == "bert" and (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


class _Layer(nn.Module):
    """One post-LN encoder layer with transformers' parameter names (attention.self.query, ..., output.LayerNorm)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.heads = cfg.num_attention_heads
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        for name in ("query", "key", "value"):
            setattr(self.attention.self, name, nn.Linear(d, d))
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(d, d)
        self.attention.output.LayerNorm = nn.LayerNorm(d, eps=eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(d, cfg.intermediate_size)
        self.output = nn.Module()
        self.output.dense = nn.Linear(cfg.intermediate_size, d)
        self.output.LayerNorm = nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, L, dim], mask [B, 1, 1, L] additive (None: every key) -> [B, L, dim]."""
        b, length, d = x.shape
        att = self.attention.self
        shape = (b, length, self.heads, d // self.heads)
        q, k, v = (getattr(att, n)(x).view(shape).transpose(1, 2) for n in ("query", "key", "value"))  # [B, H, L, D]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=(d // self.heads) ** -0.5)
        o = o.transpose(1, 2).reshape(b, length, d)
        x = self.attention.output.LayerNorm(self.attention.output.dense(o) + x)
        h = self.output.dense(F.gelu(self.intermediate.dense(x)))
        return self.output.LayerNorm(h + x)


class BertEncoder(nn.Module):
    """input_ids, attention_mask [B, L] -> `.last_hidden_state` [B, L, dim] fp32, as transformers' BertModel."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(cfg.vocab_size, d)
        self.embeddings.position_embeddings = nn.Embedding(cfg.max_position_embeddings, d)
        self.embeddings.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, d)
        self.embeddings.LayerNorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([_Layer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.config = cfg  # what the exporter reads (vocab_size, max_position_embeddings), as on transformers' models
        self.max_len = cfg.max_position_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        length = input_ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"the prompt is {length} tokens long; this text encoder reads at most {self.max_len}")
        emb = self.embeddings
        pos = torch.arange(length, device=input_ids.device)
        x = emb.word_embeddings(input_ids) + emb.token_type_embeddings(torch.zeros_like(input_ids))
        x = emb.LayerNorm(x + emb.position_embeddings(pos)[None])
        mask = None
        if attention_mask is not None:  # padded keys get the dtype's lowest value, as transformers' masks do
            keep = attention_mask[:, None, None, :].bool()  # [B, 1, 1, L]
            mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, torch.finfo(x.dtype).min)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return SimpleNamespace(last_hidden_state=x)

    @classmethod
    def load(cls, folder: Path) -> BertEncoder:
        from safetensors.torch import load_file

        from .loading import shapes_only

        with shapes_only():  # no memory, no initialisation: every weight is the file's tensor, assigned
            model = cls(BertConfig.read(folder))
        state = {k: v for k, v in load_file(folder / "model.safetensors").items()
                 if not k.startswith("pooler.") and k != "embeddings.position_ids"}
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(f"{folder}/model.safetensors is not a BERT encoder of its config.json: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}")
        return model.eval()


class BertTokenizer:
    """The folder's tokenizer.json through the `tokenizers` library, with its own padding and truncation switched
    off, as transformers' tokenizer calls run it. Answers what the engine and the exporter ask of a tokenizer."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        self.folder = folder
        self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.no_truncation()

    def __call__(self, text: str | list[str], return_tensors: str | None = None) -> dict[str, Any]:
        """One text -> {"input_ids": [ids]}; a list -> {"input_ids": [[ids], ...]} (a [B, L] tensor with "pt",
        all of one length)."""
        if isinstance(text, str):
            return {"input_ids": self._tok.encode(text).ids}
        ids = [e.ids for e in self._tok.encode_batch(text)]
        return {"input_ids": torch.tensor(ids, dtype=torch.long) if return_tensors == "pt" else ids}

    def save_pretrained(self, folder: str | Path) -> None:
        """Copy the tokenizer's files (what transformers' AutoTokenizer and the export's clients read)."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (self.folder / name).is_file():
                shutil.copy(self.folder / name, Path(folder) / name)
