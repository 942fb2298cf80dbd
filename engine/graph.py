"""Programs captured once per shape and replayed with new numbers (CUDA graphs).

MAGNeT's decoding program (`magnet.run_together`: every stage and step of one request, or of requests that start
together) and the AR baseline's frame loop have no host synchronisation and no data-dependent control flow, so each
runs as one CUDA graph: the host launches one replay per request instead of ~2,000 kernels per LM pass. The
scheduler, whose requests join and leave at every step, captures one LM pass per layout instead (`api.GraphedPass`).
A captured program reads its request's numbers from static input tensors; `Captured.__call__` copies a new
request's into them, replays, and the outputs are read from the static output tensors (valid until the next replay).

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

    def __init__(self, fn: Callable[[], Out], inputs: Sequence[torch.Tensor], device: torch.device,
                 pool: tuple[int, int] | None = None) -> None:
        """`pool`: a memory pool shared with other graphs (`torch.cuda.graph_pool_handle()`), for graphs that are
        never replayed concurrently and whose outputs are read before the next replay of any of them."""
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
            with torch.cuda.graph(self.graph, pool=pool):
                self.out = fn()
            self._load(saved)
            torch.cuda.synchronize(device)
        self.capture_s = time.perf_counter() - start

    def _load(self, values: Sequence[torch.Tensor]) -> None:
        if len(values) != len(self.inputs):
            raise ValueError(f"a captured program takes {len(self.inputs)} inputs, got {len(values)}")
        pairs = [(dst, src) for dst, src in zip(self.inputs, values) if src is not dst]
        if pairs:  # one multi-tensor launch on CUDA rather than one copy per tensor (a pass has 2 per layer)
            torch._foreach_copy_([dst for dst, _ in pairs], [src for _, src in pairs])

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

    def __contains__(self, key: Hashable) -> bool:
        return key in self.entries

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
