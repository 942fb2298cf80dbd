"""Whole programs captured once per request shape and replayed per request (CUDA graphs).

MAGNeT's decoding program (`magnet.run_program`: every stage and step) and the AR baseline's frame loop have no host
synchronisation and no data-dependent control flow, so each runs as one CUDA graph: the host launches one replay
per request instead of ~2,000 kernels per LM pass. A captured program reads its request's numbers from static input
tensors; `Captured.__call__` copies a new request's into them, replays, and the outputs are read from the static
output tensors (valid until the next replay).

On a CPU there is nothing to capture: `Captured` then runs the function eagerly on the same static tensors, so the
replay contract (every request's numbers reach the program only through the inputs) is tested on any machine.
"""
from __future__ import annotations

import collections
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

import torch

Out = TypeVar("Out")


class Captured(Generic[Out]):
    """`fn()` reading `inputs` (static tensors it closes over), captured as a CUDA graph on a CUDA device.

    Capture: two warm-up runs on a side stream (cuBLAS workspaces, Triton's first launch), then one run under
    `torch.cuda.graph`; `capture_s` is what it cost. The first request's numbers are the ones in `inputs` when
    the program is built; `__call__(new)` copies the next request's into them and replays.
    """

    def __init__(self, fn: Callable[[], Out], inputs: Sequence[torch.Tensor], device: torch.device) -> None:
        self.fn, self.inputs, self.device = fn, list(inputs), device
        self.graph: torch.cuda.CUDAGraph | None = None
        start = time.perf_counter()
        if device.type == "cuda":
            saved = [x.clone() for x in self.inputs]  # warm-up runs may write into their own inputs
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn()
                    self._load(saved)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = fn()
            self._load(saved)
            torch.cuda.synchronize(device)
        self.capture_s = time.perf_counter() - start

    def _load(self, values: Sequence[torch.Tensor]) -> None:
        if len(values) != len(self.inputs):
            raise ValueError(f"a captured program takes {len(self.inputs)} inputs, got {len(values)}")
        for dst, src in zip(self.inputs, values):
            if src is not dst:
                dst.copy_(src)

    def __call__(self, values: Sequence[torch.Tensor]) -> Out:
        """Run the program on `values` (same shapes, dtypes and order as the capture's inputs)."""
        self._load(values)
        if self.graph is None:
            self.out = self.fn()
        else:
            self.graph.replay()
        return self.out


class ProgramCache:
    """A few captured programs by shape key, least recently used first out (each holds its buffers and, on CUDA,
    its graph's memory pool). `captures` counts the programs built and `capture_s` their total capture time."""

    def __init__(self, capacity: int = 4) -> None:
        if capacity < 1:
            raise ValueError(f"a program cache holds at least 1 program, got capacity={capacity}")
        self.capacity = capacity
        self.entries: collections.OrderedDict[Hashable, Captured] = collections.OrderedDict()
        self.captures, self.capture_s = 0, 0.0

    def run(self, key: Hashable, build: Callable[[], Captured[Out]], inputs: Sequence[torch.Tensor]) -> Out:
        """The program for `key` (built by `build()` the first time, from these very inputs) run on `inputs`."""
        entry = self.entries.get(key)
        if entry is None:
            entry = build()
            self.captures += 1
            self.capture_s += entry.capture_s
            self.entries[key] = entry
            while len(self.entries) > self.capacity:
                self.entries.popitem(last=False)
        self.entries.move_to_end(key)
        return entry(inputs)
