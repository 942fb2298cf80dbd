"""`magnet export --quantize int8`: onnxruntime dynamic int8 quantization of the text encoder, the cross k/v and the
LM step (weights int8, activations quantized per call; the codec stays fp32), measured against the fp32 graphs it
replaces and recorded in the manifest's "quantization" section.

Works on a finished fp32 export folder, so it needs no torch model: the probe inputs are the exported tokenizer's
ids for a few prompts, their fp32 text embeddings and cross k/v, and half-masked random codes at the segment's
length (fixed seed), run through both graphs.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .graph_meta import stamp, step_meta_of
from .manifest import MANIFEST, sha256_file

QUANTIZE = ("int8",)
QUANTIZED_GRAPHS = ("text_encoder", "cross_kv", "lm_step")
PROMPTS = ("upbeat electronic dance track with a heavy bass line at 128 bpm", "slow sad piano")
SEED = 0


def _session(path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _probes(export_dir: Path, manifest: dict[str, Any]) -> dict[str, list[dict[str, np.ndarray]]]:
    """Feeds per graph: real prompts' ids -> fp32 embeddings -> fp32 cross k/v -> half-masked codes per stage."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(export_dir / manifest["tokenizer"] / "tokenizer.json"))
    text = _session(export_dir / "text_encoder.onnx")
    ids = [np.array([tok.encode(p).ids], dtype=np.int64) for p in PROMPTS]
    te_feeds = [{"input_ids": i, "attention_mask": np.ones_like(i)} for i in ids]
    embeds = [text.run(None, f)[0][0] for f in te_feeds]
    length = max(e.shape[0] for e in embeds)
    cond = np.zeros((len(embeds), length, embeds[0].shape[-1]), dtype=np.float32)  # the engine's padding rule
    for i, e in enumerate(embeds):
        cond[i, : e.shape[0]] = e
    kv_names = manifest["cross_kv_names"]
    kv = dict(zip(kv_names, _session(export_dir / "cross_kv.onnx").run(kv_names, {"text_embeds": cond})))
    c = manifest["client"]
    rng = np.random.default_rng(SEED)
    shape = (2 * len(PROMPTS), c["codebooks"], c["limits"]["frames"][1])
    codes = rng.integers(0, c["vocab"], shape)
    codes[rng.random(shape) < 0.5] = c["mask_id"]
    steps = [{"codes": codes, "stage": np.array(s, dtype=np.int64), **kv} for s in range(c["codebooks"])]
    return {"text_encoder": te_feeds, "cross_kv": [{"text_embeds": cond}], "lm_step": steps}


def _quantize(src: Path, dst: Path, tmp: Path) -> None:
    """Constant-fold first (the exported graphs slice q/k/v weights out of packed in_proj matrices at run time, and
    only a MatMul whose weight is an initializer is quantized), then quantize MatMul/Gather weights to int8."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folded = tmp / f"{src.stem}.folded.onnx"
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # standard ONNX ops only
    so.optimized_model_filepath = str(folded)
    so.log_severity_level = 3
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "consider pre-processing": the folding above is that pre-processing
    try:
        quantize_dynamic(str(folded), str(dst), weight_type=QuantType.QInt8, per_channel=False)
    finally:
        root.setLevel(level)


def _compare(fp32: Any, int8: Any, feeds: list[dict[str, np.ndarray]], argmax: bool) -> dict[str, Any]:
    err = ref = 0.0
    agree = total = 0
    for f in feeds:
        for a, b in zip(fp32.run(None, f), int8.run(None, f)):
            err = max(err, float(np.abs(a.astype(np.float64) - b).max()))
            ref = max(ref, float(np.abs(a).max()))
            if argmax:
                agree += int((a.argmax(-1) == b.argmax(-1)).sum())
                total += a.shape[0] * a.shape[1]
    out: dict[str, Any] = {"max_abs_err": err, "max_abs_ref": ref, "probe_calls": len(feeds)}
    if argmax:
        out["argmax_agreement"] = agree / total
    return out


def quantize_export(export_dir: str | Path, manifest: dict[str, Any], method: str = "int8",
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Quantize an fp32 export in place: replaces the three graphs' files, updates their manifest entries, records
    "quantization" and rewrites manifest.json (atomically, last). Returns the manifest."""
    export_dir = Path(export_dir)
    if method not in QUANTIZE:
        raise ValueError(f"unknown quantization {method!r}: choose one of {list(QUANTIZE)}")
    if manifest.get("quantization") or manifest.get("dtype") != "float32":
        raise ValueError(f"{export_dir} is not a plain float32 export; quantize a fresh `magnet export` folder")
    say = log or (lambda msg: None)
    probes = _probes(export_dir, manifest)
    record: dict[str, Any] = {"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8",
                              "per_channel": False, "graphs": {}}
    (export_dir / MANIFEST).unlink(missing_ok=True)  # a failure midway must not leave a valid-looking dir
    with tempfile.TemporaryDirectory(dir=export_dir) as tmp:
        for name in QUANTIZED_GRAPHS:
            spec = manifest["graphs"][name]
            path = export_dir / spec["file"]
            fp32_path = Path(tmp) / path.name
            shutil.move(path, fp32_path)
            for stale in export_dir.glob(path.name + ".*"):  # external data of the fp32 graph
                shutil.move(stale, Path(tmp) / stale.name)
            say(f"quantizing {name} (int8)")
            _quantize(fp32_path, path, Path(tmp))
            stamp(path, step_meta_of(fp32_path), name)  # its limits metadata and named input guard, as fp32's
            result = _compare(_session(fp32_path), _session(path), probes[name], argmax=name == "lm_step")
            files = [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
                     for p in sorted(export_dir.glob(path.name + "*")) if p.is_file()]
            result.update(bytes_fp32=sum(p.stat().st_size for p in Path(tmp).glob(path.name + "*")),
                          bytes=sum(f["bytes"] for f in files))
            spec.update(files=files, weights="int8")
            record["graphs"][name] = result
            say(f"  {name}: {result['bytes_fp32'] / 1e6:.1f} -> {result['bytes'] / 1e6:.1f} MB, max abs err "
                f"{result['max_abs_err']:.2e}" + (f", argmax agreement {result['argmax_agreement']:.3f}"
                                                  if "argmax_agreement" in result else ""))
    manifest["quantization"] = record
    text = json.dumps(manifest, indent=2) + "\n"
    tmp_manifest = export_dir / (MANIFEST + ".tmp")
    tmp_manifest.write_text(text)
    os.replace(tmp_manifest, export_dir / MANIFEST)
    return json.loads(text)
