"""The torch backend's decoding step and LM passes: a request's step over the plain LM (`TorchStep` ->
`TorchRequestStep`), several requests in one pass packed along the rows (`PackedPass`, the scheduler's), and that
pass captured as a CUDA graph per batch layout (`GraphedPass`). `engine.api.Engine` uses them by default; other
backends swap their own step in (engine.backends)."""
from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import magnet
from .graph import Captured, ProgramCache, copy_grouped
from .model import LM, CrossKV, JoinedTexts, Rows, fold_texts, folded_length


class TorchStep:
    """Text embeddings [B, L, dim] -> the request's step (`TorchRequestStep`), its cross-attention k/v computed once.
    On the CPU they are folded into the projections where that saves work (`engine.model.fold_texts`: ~10% of a
    default-model request); on CUDA they stay k/v (unmeasured there; the captured programs were measured so)."""

    def __init__(self, lm: LM) -> None:
        self.lm = lm

    def __call__(self, cond: torch.Tensor) -> TorchRequestStep:
        return self.many([cond])[0]

    def many(self, conds: Sequence[torch.Tensor]) -> list[TorchRequestStep]:
        """Several requests' steps at once (the scheduler's requests that start together), each the one `self(cond)`
        gives it bit for bit: texts folded at one length are folded in one batched product (`fold_texts`)."""
        steps: list[TorchRequestStep] = [None] * len(conds)  # type: ignore[list-item]
        groups: dict[int | None, list[int]] = {}
        for i, cond in enumerate(conds):
            groups.setdefault(folded_length(self.lm, cond), []).append(i)
        for length, idx in groups.items():
            crosses = ([self.lm.cross_kv(conds[i]) for i in idx] if length is None
                       else fold_texts(self.lm, [conds[i] for i in idx], length))
            for i, cross in zip(idx, crosses):
                steps[i] = TorchRequestStep(self.lm, cross)
        return steps


class TorchRequestStep:
    """One request's `magnet.Step` on the torch LM: codes [B, K, T] -> (cond, uncond) logits [B, T, V], or [B, n, V]
    at `frames` [B, n] (the LM's last layer then runs on those frames only)."""

    def __init__(self, lm: LM, cross: CrossKV) -> None:
        self.lm, self.cross = lm, cross

    def __call__(self, codes: torch.Tensor, stage: int, guided: bool, frames: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        # rows past the text's B are unconditional (LM.forward): none when unguided; they sample the same frames
        rows_frames = None if frames is None else magnet.step_rows(frames, guided)
        return magnet.split_rows(self.lm(magnet.step_rows(codes, guided), stage, self.cross, rows_frames), guided)


class PackedPass:
    """The torch backend's `magnet.Pass`: several requests in one LM pass packed along the rows
    (`LM.forward_packed`: each request's logits bit for bit its own pass's); one request alone runs its own step."""

    def __init__(self, lm: LM) -> None:
        self.lm = lm
        self.joined = JoinedTexts()  # its runs' folded texts, concatenated once while a run keeps its requests

    def __call__(self, decs: Sequence[magnet.Decoding]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if len(decs) == 1:
            return magnet.each_alone(decs)  # its own step, at the frames it samples
        if all(d.index is None for d in decs):
            return self.every_frame(decs)
        # the pack's last layer runs at the frames each request samples, as its own step does (`LM.forward`)
        frames = [torch.arange(d.codes.shape[-1], device=d.codes.device).expand(d.codes.shape[0], -1) if d.index is None
                  else d.index for d in decs]
        return self.packed(decs, frames)

    def every_frame(self, decs: Sequence[magnet.Decoding | _Slot]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The pass's (cond, uncond) logits of every frame [B, T, V], per request (what a captured pass records)."""
        if len(decs) == 1:
            return [decs[0].step(decs[0].codes, decs[0].stage, decs[0].guided)]
        return self.packed(decs, None)

    def packed(self, decs: Sequence[magnet.Decoding | _Slot], frames: Sequence[torch.Tensor] | None
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One packed pass (`LM.forward_packed`): per request its (cond, uncond) logits [B, T, V], or [B, n, V] at
        its `frames` [B, n]."""
        # packed in layout order, so requests of equal frames, stage and text length are neighbours and share their
        # attention calls (engine.model.Packed); each request's logits are its own whatever its place
        order = sorted(range(len(decs)), key=lambda i: pass_layout(decs[i]))
        parts = [Rows(magnet.step_rows(d.codes, d.guided), d.stage, d.step.cross) for d in (decs[i] for i in order)]
        part_frames = None if frames is None else [magnet.step_rows(frames[i], decs[i].guided) for i in order]
        out: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(decs)  # type: ignore[list-item]
        for i, lg in zip(order, self.lm.forward_packed(parts, part_frames, self.joined)):
            out[i] = magnet.split_rows(lg, decs[i].guided)
        return out


@dataclass
class _Slot:
    """A request's static stand-in in a captured pass (`GraphedPass`): the buffers `PackedPass` reads."""

    codes: torch.Tensor  # [B, K, T]
    stage: int
    guided: bool
    step: TorchRequestStep  # its text k/v, static


def text_kv(step: TorchRequestStep) -> list[torch.Tensor]:
    """Every layer's text k and v of a request: inputs of a captured pass or program."""
    return [t for kv in step.cross for t in kv]


def static_step(lm: LM, step: TorchRequestStep) -> TorchRequestStep:
    """A request's step on copies of its text k/v: a captured graph's own buffers, which later requests fill."""
    return TorchRequestStep(lm, [entry._make(t.clone() for t in entry) for entry in step.cross])


def pass_layout(dec: magnet.Decoding) -> tuple:
    """What fixes the operations of a request's share of a packed pass: its rows and frames, its stage (attention
    window, head), guidance, and its text k/v's shape (the text length) and dtype."""
    cross = dec.step.cross
    text = (tuple(cross[0][0].shape), str(cross[0][0].dtype)) if cross else ()
    return tuple(dec.codes.shape), dec.stage, dec.guided, text


class GraphedPass:
    """The scheduler's LM pass (`PackedPass`) captured as one CUDA graph per layout (the requests' `pass_layout`s, in a
    canonical order) and replayed while the layout recurs (`Engine.set_graph`).

    A steady batch keeps its layout from step to step; it changes when a request joins, leaves or moves to the next
    codebook. So a layout is captured on its second pass in a row (or when already cached) and a layout seen once
    runs eagerly: a one-off costs no capture. Requests are packed in the canonical order either way, and a
    replay runs the eager pass's kernels, so the tokens are the eager pass's (a deterministic engine's: each
    request's solo tokens). The graphs share one memory pool (one pass's activations, not one per layout): the
    scheduler reads a pass's logits before the next pass.

    A replay copies each request's codes, and a slot's text k/v only when another request took the slot (they never
    change during a request), grouped by dtype. A layout whose capture fails runs eagerly from then on, with the
    reason in `graphs.failures`: a capture error is the engine's, never a request's failure.
    """

    def __init__(self, lm: LM, device: torch.device, capacity: int = 32) -> None:
        self.lm, self.device = lm, device
        self.eager = PackedPass(lm)
        self.graphs = ProgramCache(capacity)
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self.last: tuple | None = None  # the previous pass's layout
        self.passes: collections.Counter[str] = collections.Counter()  # "eager" / "graph" passes run
        # per captured layout: its slots (static buffers) and the step whose text k/v each holds now
        self.slots: dict[tuple, tuple[list[_Slot], list[magnet.Step]]] = {}

    def __call__(self, decs: Sequence[magnet.Decoding]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        layouts = [pass_layout(d) for d in decs]
        order = sorted(range(len(decs)), key=layouts.__getitem__)
        key = tuple(layouts[i] for i in order)
        ordered = [decs[i] for i in order]
        graph = None
        if key in self.graphs or key == self.last:
            graph = self.graphs.get(key, lambda: self._capture(key, ordered))
        if graph is None:
            logits = self.eager.every_frame(ordered)
            self.passes["eager"] += 1
        else:
            self._fill(key, ordered)
            logits = graph.replay()
            self.passes["graph"] += 1
        self.last = key
        out: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(decs)  # type: ignore[list-item]
        for i, lg in zip(order, logits):
            out[i] = decs[i].sampled_logits(*lg)
        return out

    def _fill(self, key: tuple, decs: Sequence[magnet.Decoding]) -> None:
        """Copy what changed since the last replay of `key`'s graph into its slots."""
        slots, holders = self.slots[key]
        pairs = []
        for i, (slot, d) in enumerate(zip(slots, decs)):
            pairs.append((slot.codes, d.codes))
            if holders[i] is not d.step:
                pairs += zip(text_kv(slot.step), text_kv(d.step))
                holders[i] = d.step
        copy_grouped(pairs)

    def _capture(self, key: tuple, decs: Sequence[magnet.Decoding]
                 ) -> Captured[list[tuple[torch.Tensor, torch.Tensor]]]:
        slots = [_Slot(d.codes.clone(), d.stage, d.guided, static_step(self.lm, d.step)) for d in decs]
        inputs = [t for s in slots for t in [s.codes, *text_kv(s.step)]]
        graph = Captured(lambda: self.eager.every_frame(slots), inputs, self.device, pool=self.pool)
        for gone in [k for k in self.slots if k not in self.graphs.entries]:  # evicted from the cache
            del self.slots[gone]
        self.slots[key] = (slots, [d.step for d in decs])
        return graph
