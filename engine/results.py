"""What a generation returns: the whole piece (`Generation`) or a streamed window (`Chunk`), and `join` from one to
the other. Below every front end: the API, the scheduler and the CLI hand them out."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Generation:
    audio: torch.Tensor  # [B, 1, samples] fp32
    codes: torch.Tensor  # [B, K, T] int64
    sample_rate: int
    seed: int | None = None  # the request's seed (drawn when none was given): prompt b drew from seed + b
    # costs of the quality levers: rescore_calls, rescore_s, rescore_s_per_step (AR forwards inside the MAGNeT
    # loop); hybrid_prefix_frames, hybrid_prefix_s (the AR prefix, text encoding included). Empty for plain runs.
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class Chunk:
    """A piece of a streamed generation (`Engine.generate_stream`): one per window."""

    audio: torch.Tensor  # [B, 1, samples] fp32: the next samples of the piece (none yet for some codecs)
    codes: torch.Tensor  # [B, K, frames] int64: the window's new tokens (window 0: with the request's prompt)
    window: int  # its index, from 0
    windows: int  # how many the piece has
    stats: dict[str, float] = field(default_factory=dict)  # the window's lever costs (see Generation.stats)


def join(chunks: Sequence[Chunk], sample_rate: int, seed: int | None = None) -> Generation:
    """A streamed generation's chunks -> the Generation `Engine.generate` returns (lever costs summed)."""
    stats: dict[str, float] = {}
    for c in chunks:
        for key, value in c.stats.items():
            stats[key] = stats.get(key, 0.0) + value
    return Generation(audio=torch.cat([c.audio for c in chunks], dim=-1),
                      codes=torch.cat([c.codes for c in chunks], dim=-1), sample_rate=sample_rate, seed=seed,
                      stats=stats)
