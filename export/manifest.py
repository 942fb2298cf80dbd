"""The export directory's contract: file names, the manifest's format version, and its validation.

Pure Python (json, hashlib): imported by both the exporter and the onnxruntime backend, never pulls in onnx/torch.

    EXPORT_DIR/
        manifest.json        what is there, how it was made, how well it matched PyTorch, the model's decoding defaults
        text_encoder.onnx    input_ids, attention_mask [1, L] int64 -> text_embeds [1, L, dim] fp32
        cross_kv.onnx        text_embeds [B, L, dim] -> cross_k_i, cross_v_i [B, H, L, D] per layer i
        lm_step.onnx         codes [N, K, T] int64, stage [] int64, cross_k_i/cross_v_i -> logits [N, T, V] fp32;
                             N = 2B ([cond; uncond], rows past B unconditional) or B (guidance 1: no uncond)
        codec_decode.onnx    codes [B, K, T] int64 -> audio [B, 1, T*hop] fp32
        codec_encode.onnx    audio [B, 1, S] fp32 -> codes [B, K, ceil(S/hop)] int64
        tokenizer/           the text tokenizer (save_pretrained; tokenizer.json with padding and truncation off),
                             so no torch model is needed at run time
    manifest.json's "client" section (export/contract.py) states what a client in another language needs to decode
    as the engine does; export/manifest.schema.json is its JSON schema.
    (a graph over 2 GB keeps its weights beside it in GRAPH.onnx.data; the manifest lists every file.)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FORMAT = "magnet-onnx"
# bump when graph names, inputs or semantics change: old exports are then refused. 2: the "client" section (the
# decoding contract), a tokenizer.json without padding/truncation, optional int8 graphs ("quantization"). 3: graphs
# that refuse inputs outside their contract (client.boundary), client.longform, the tie and rounding rules
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SCHEMA = Path(__file__).with_name("manifest.schema.json")  # the manifest's JSON schema (draft 2020-12)
GRAPHS = ("text_encoder", "cross_kv", "lm_step", "codec_decode", "codec_encode")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def reexport_hint(export_dir: Path, manifest: dict[str, Any] | None = None) -> str:
    """The fix-it sentence every validation error ends with, naming the source model when the manifest knows it."""
    src = None
    if isinstance(manifest, dict) and isinstance(manifest.get("source"), dict):
        src = manifest["source"].get("model")
    return f"re-export with `magnet export --model {src or 'MODEL'} --out {export_dir}`"


def is_export(folder: Path) -> bool:
    """A folder with an export's manifest; whether it is intact, read_manifest says (with how to fix it)."""
    return (folder / MANIFEST).is_file()


def read_manifest(export_dir: str | Path, verify: bool = True) -> dict[str, Any]:
    """Load and validate `export_dir/manifest.json` and the files it lists (existence, size, and with `verify`
    their sha256). Raises ValueError saying what is wrong and how to fix it."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise ValueError(f"ONNX export dir {export_dir} does not exist; create it with "
                         f"`magnet export --model MODEL --out {export_dir}`")
    path = export_dir / MANIFEST
    if not path.is_file():
        raise ValueError(f"{export_dir} is not an ONNX export (no {MANIFEST}; an interrupted export leaves none); "
                         f"{reexport_hint(export_dir)}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {reexport_hint(export_dir)}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a MAGNeT ONNX manifest (format {FORMAT!r} expected); "
                         f"{reexport_hint(export_dir)}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{export_dir} was written in export format version {version}, this engine reads version "
                         f"{FORMAT_VERSION} (an export is read by the engine version that wrote it); "
                         f"{reexport_hint(export_dir, manifest)}")
    graphs = manifest.get("graphs")
    if not isinstance(graphs, dict) or set(graphs) != set(GRAPHS):
        found = sorted(graphs) if isinstance(graphs, dict) else graphs
        raise ValueError(f"{path} lists graphs {found}, expected {list(GRAPHS)}; {reexport_hint(export_dir, manifest)}")
    for key in ("model_config", "codec", "tokenizer", "client"):
        if key not in manifest:
            raise ValueError(f"{path} lacks {key!r}; {reexport_hint(export_dir, manifest)}")
    for name, graph in graphs.items():
        files = graph.get("files") if isinstance(graph, dict) else None
        if not files or graph.get("file") not in [e.get("name") for e in files]:
            raise ValueError(f"{path}: the {name} graph entry lists no files; {reexport_hint(export_dir, manifest)}")
        for entry in files:
            f = export_dir / entry["name"]
            if not f.is_file():
                raise ValueError(f"{f} is missing from the export ({name} graph); "
                                 f"{reexport_hint(export_dir, manifest)}")
            if f.stat().st_size != entry["bytes"]:
                raise ValueError(f"{f} has {f.stat().st_size} bytes, the manifest says {entry['bytes']}: the file "
                                 f"is truncated or from another export; {reexport_hint(export_dir, manifest)}")
            if verify and sha256_file(f) != entry["sha256"]:
                raise ValueError(f"{f} does not match its sha256 in the manifest (corrupted, or from another "
                                 f"export); {reexport_hint(export_dir, manifest)}")
    if not (export_dir / manifest["tokenizer"]).is_dir():
        raise ValueError(f"the tokenizer folder {export_dir / manifest['tokenizer']} is missing; "
                         f"{reexport_hint(export_dir, manifest)}")
    return manifest
