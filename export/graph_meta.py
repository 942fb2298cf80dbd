"""What an exported graph carries besides its maths: its limits metadata (`metadata_props`, read by onnxruntime as
`custom_metadata_map`) and the name of its input guard's node (onnxruntime's error on a refused input names it).
Written by the exporter (export.onnx_export) and again by the quantizer (export.quantize) on the graphs it replaces.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


class ExportCheckError(ValueError):
    """A graph disagrees with the PyTorch path beyond tolerance: the export is refused (no manifest is written)."""


GUARD = "input_contract"  # the guard's table and, after export, its Gather node's name stem (see `stamp`)
GUARDED = ("text_encoder", "lm_step", "codec_decode")  # the graphs with a Guard


def guard_node(graph: str) -> str:
    """The name of a graph's input-guard node: onnxruntime's error on a refused input names it."""
    return f"{GUARD}_violated__see_manifest_client_boundary_{graph}"


def step_meta_of(path: Path) -> dict[str, int]:
    import onnx

    return {p.key: int(p.value) for p in onnx.load(str(path), load_external_data=False).metadata_props}


def stamp(path: Path, meta: dict[str, int], graph: str) -> None:
    """Write `meta` into the graph's metadata_props (onnxruntime: `get_modelmeta().custom_metadata_map`) and name
    its input guard's node, so that the error of a run it refuses says why (`guard_node`)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=str(value))
    guards = [n for n in model.graph.node if n.op_type == "Gather" and any(GUARD in i for i in n.input[:1])]
    if len(guards) != (graph in GUARDED):
        raise ExportCheckError(f"{path.name}: expected one input-guard Gather, found {len(guards)}; the exporter "
                               "rewrote the guard. Report this with the versions of torch, onnx and onnxscript")
    for node in guards:
        node.name = guard_node(graph)
    if graph == "text_encoder":
        _own_mask_dims(model.graph)
    onnx.save(model, str(path))  # external data (past 2 GB) stays where it is: only the graph proto is rewritten


MASK_DIMS = ("mask_batch", "mask_text_len")


def _own_mask_dims(graph: Any) -> None:
    """The exporter gives attention_mask the ids' symbolic dims (batch, text_len) and records the shapes of what it
    computes in value_info; onnxruntime plans its buffers on those names, so a mask of another shape failed inside
    a ReduceSum (a buffer of the wrong size) before the guard could compare the two. The mask gets dims of its own
    and the recorded intermediate shapes go (onnxruntime infers them again from the inputs)."""
    mask = next(i for i in graph.input if i.name == "attention_mask")
    for dim, name in zip(mask.type.tensor_type.shape.dim, MASK_DIMS):
        dim.dim_param = name
    del graph.value_info[:]
