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
import logging
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch.overrides import TorchFunctionMode

Out = TypeVar("Out")
log = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """A program that could not be captured as a CUDA graph (`Captured`): its caller runs it eagerly instead and
    counts it (`ProgramCache.failures`); never a request's failure."""


class Captured(Generic[Out]):
    """`fn()` reading `inputs` (static tensors it closes over), captured as a CUDA graph on a CUDA device.

    Capture: two warm-up runs on a side stream (cuBLAS workspaces, Triton's first launch), then one run under
    `torch.cuda.graph`; `capture_s` is what it cost. The first request's numbers are the ones in `inputs` when
    the program is built; `__call__(new)` copies the next request's into them and replays. A capture that fails
    raises `CaptureError` with the inputs restored and the calling thread back on the stream it came from.
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
            stream = torch.cuda.current_stream(device)
            try:
                side = torch.cuda.Stream(device)
                side.wait_stream(stream)
                with torch.cuda.stream(side):
                    for _ in range(2):
                        fn()
                        self._load(saved)
                stream.wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, pool=pool):
                    self.out = fn()
            except Exception as e:  # noqa: BLE001 - any failure to capture is reported as one, with its cause
                # torch.cuda.graph's exit skips restoring the stream when capture_end raises
                torch.cuda.set_stream(stream)
                self.graph = None
                torch.cuda.synchronize(device)
                self._load(saved)
                raise CaptureError(f"{type(e).__name__}: {e}") from e
            self._load(saved)
            torch.cuda.synchronize(device)
        self.capture_s = time.perf_counter() - start

    def _load(self, values: Sequence[torch.Tensor]) -> None:
        if len(values) != len(self.inputs):
            raise ValueError(f"a captured program takes {len(self.inputs)} inputs, got {len(values)}")
        copy_grouped([(dst, src) for dst, src in zip(self.inputs, values) if src is not dst])

    def __call__(self, values: Sequence[torch.Tensor]) -> Out:
        """Run the program on `values` (same shapes, dtypes and order as the capture's inputs)."""
        self._load(values)
        return self.replay()

    def replay(self) -> Out:
        """Run the program on what its inputs hold now (the caller filled them)."""
        if self.graph is None:
            self.out = self.fn()
        else:
            self.graph.replay()
        return self.out


def copy_grouped(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """dst.copy_(src) for every pair, as one multi-tensor launch per (dtype, device) group (`_foreach_copy_`'s fast
    path takes one dtype; a pass has 2 text tensors per layer per request)."""
    groups: dict[tuple[torch.dtype, torch.device], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for dst, src in pairs:
        groups.setdefault((dst.dtype, dst.device), []).append((dst, src))
    for group in groups.values():
        torch._foreach_copy_([dst for dst, _ in group], [src for _, src in group])


class ProgramCache:
    """A few captured programs by shape key, least recently used first out (each holds its buffers and, on CUDA,
    its graph's memory pool). `captures` counts the programs built and `capture_s` their total capture time;
    `failures` holds each key whose capture failed, with the reason: such a key runs eagerly from then on."""

    def __init__(self, capacity: int = 4) -> None:
        if capacity < 1:
            raise ValueError(f"a program cache holds at least 1 program, got capacity={capacity}")
        self.capacity = capacity
        self.entries: collections.OrderedDict[Hashable, Captured] = collections.OrderedDict()
        self.captures, self.capture_s = 0, 0.0
        self.failures: dict[Hashable, str] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self.entries or key in self.failures

    def get(self, key: Hashable, build: Callable[[], Captured[Out]]) -> Captured[Out] | None:
        """The program for `key`, built by `build()` the first time (from the inputs it is given then); None when
        its capture failed, now or before (the caller runs eagerly)."""
        if key in self.failures:
            return None
        entry = self.entries.get(key)
        if entry is None:
            try:
                entry = build()
            except CaptureError as e:
                self.failures[key] = str(e)
                log.warning("magnet: capturing a program failed, it runs eagerly from now on: %s", e)
                return None
            self.captures += 1
            self.capture_s += entry.capture_s
            self.entries[key] = entry
            while len(self.entries) > self.capacity:
                self.entries.popitem(last=False)
        self.entries.move_to_end(key)
        return entry

    def run(self, key: Hashable, build: Callable[[], Captured[Out]], inputs: Sequence[torch.Tensor],
            eager: Callable[[], Out]) -> Out:
        """The program for `key` (see `get`) run on `inputs`; `eager()` instead when it could not be captured."""
        entry = self.get(key, build)
        return eager() if entry is None else entry(inputs)


@dataclass(frozen=True)
class Violation:
    kind: str  # "copy", "sync", "shape" or "mixed" (see CaptureCheck)
    op: str  # the torch function
    where: str  # file:line of the engine code that called it

    def __str__(self) -> str:
        return f"{self.where}: {self.op} ({self.kind})"


_HOST_DATA = {"tensor", "as_tensor", "asarray", "from_numpy"}
_MOVES = {"to", "cuda", "cpu", "copy_", "_foreach_copy_"}
_SYNCS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "__array__"}
_SHAPES = {"nonzero", "masked_select", "unique", "unique_consecutive", "argwhere", "bincount"}
_INDEXING = {"__getitem__", "__setitem__", "index_put_", "index_put"}
_HERE = Path(__file__).resolve()
_TORCH = Path(torch.__file__).resolve().parent


def _tensors(values: Any) -> list[torch.Tensor]:
    """The tensors among call arguments (one level into lists and tuples: torch.cat's operands, an index tuple)."""
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out += [x for x in v if isinstance(x, torch.Tensor)]
    return out


class CaptureCheck(TorchFunctionMode):
    """While active, records every torch call that a CUDA graph capture forbids or silently freezes:

    - `copy`: host data copied to a device (torch.tensor / as_tensor on a device; to / cuda / copy_ across devices);
    - `sync`: device data read by the host (item, tolist, bool(), int(), float(), numpy; host tensors may be);
    - `shape`: an output whose shape depends on data (nonzero, masked_select, unique, indexing by a boolean mask,
      repeat_interleave by a tensor): it syncs, and a graph would freeze the shape;
    - `mixed`: a host tensor among a device op's operands: an implicit copy whose value a graph would freeze.

    On a CPU, host and device are one and nothing is copied, so run the code on the `meta` device: every tensor
    made without `device=` is then a host tensor, and its way onto the device stands out (tests/test_capture.py).
    """

    def __init__(self) -> None:
        super().__init__()
        self.violations: list[Violation] = []

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        self._record(self._read(name, args, kwargs), name)  # before the call: meta refuses some of these
        out = func(*args, **kwargs)
        self._record(self._moved(name, args, kwargs, out), name)
        return out

    def _record(self, kind: str | None, name: str) -> None:
        if kind is not None:
            self.violations.append(Violation(kind, name, _caller()))

    @staticmethod
    def _read(name: str, args: tuple, kwargs: dict) -> str | None:
        """A device tensor read by the host, or given a data-dependent shape (host tensors may: set-up's maths)."""
        operands = _tensors(args) + _tensors(kwargs.values())
        if not any(t.device.type != "cpu" for t in operands):
            return None
        if name in _SYNCS:
            return "sync"
        if name in _SHAPES or (name == "repeat_interleave" and len(operands) > 1 and "output_size" not in kwargs):
            return "shape"
        if name in _INDEXING and len(args) > 1 and any(t.dtype == torch.bool for t in _tensors(args[1:2])):
            return "shape"  # a boolean mask as the index (not as the value written)
        return None

    @staticmethod
    def _moved(name: str, args: tuple, kwargs: dict, out: Any) -> str | None:
        """Host data that reached the device, or a host tensor among a device op's operands."""
        operands = _tensors(args) + _tensors(kwargs.values())
        if name in _HOST_DATA:
            source = args[0] if args else None
            if isinstance(source, torch.Tensor) and source.device == getattr(out, "device", None):
                return None  # already there: no copy
            target = out.device if isinstance(out, torch.Tensor) else None
            return "copy" if target is not None and target.type != "cpu" else None
        devices = {t.device for t in operands + ([out] if isinstance(out, torch.Tensor) else [])}
        if len({d.type for d in devices}) > 1:
            return "copy" if name in _MOVES else "mixed"
        return None


def _caller() -> str:
    """file:line of the innermost frame outside torch and this module: the engine code that made the call."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        if path != _HERE and _TORCH not in path.parents:
            return f"{path.parent.name}/{path.name}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"
