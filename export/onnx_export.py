"""Export a trained MAGNeT model to ONNX graphs, each checked against the PyTorch path before the manifest is written.

    export_model("facebook/magnet-small-10secs", Path("out/magnet-small-onnx"))   # or `magnet export ...`

The graphs reuse the engine's modules (LM.embed / layers / out_norm / cross_kv, the text encoder and projection,
the codec's encoder / decoder / quantizer). Three transforms are applied from outside, for export only, and undone
afterwards (the engine has no ONNX branches):

* every attention module's `attend` becomes explicit softmax attention with a dense boolean mask. The band of
  stages >= 1 depends on the `stage` *input*, so it is built inside the graph from T and the stage
  (`band | stage == 0`) instead of being a Python `window`;
* every `nn.LSTM` of the codec becomes ONNX `LSTM` ops (`torch.onnx.ops.symbolic`): torch.export traces
  nn.LSTM through a decomposition that fixes the sequence length, so the graph would only run at the example T;
* SymInt floor division is lowered with floor semantics (torchlib's `_operator::floordiv` is a truncating Div,
  "positive inputs only"; the codec's ceil-padding arithmetic `-(-(n) // s)` has negative numerators, and the
  encoder then returned floor(S/hop) frames instead of ceil(S/hop)).

Shapes: B prompts, L text tokens, K codebooks, T frames (<= the model's segment), H heads, D head dim, V = card.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import operator
import os
import platform
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from magnet_engine.engine.config import ModelConfig, default_generation
from magnet_engine.engine.model import LM, Dense, attention_ops
from magnet_engine.engine.ops import band_mask
from torch import nn

from .contract import client_contract
from .graph_meta import GUARD, GUARDED, ExportCheckError, guard_node, stamp, step_meta_of  # noqa: F401 - re-exported
from .manifest import FORMAT, FORMAT_VERSION, GRAPHS, MANIFEST, TOKENIZER_DIR, sha256_file
from .quantize import QUANTIZE, quantize_export

DTYPES = {"float32": torch.float32, "float16": torch.float16}
MIN_OPSET = 18  # the dynamo exporter's torchlib targets opset 18 and later
FP32_TOL = 1e-4  # max |onnx - torch|, relative to the output's scale when that exceeds 1 (see _tolerance)
FP16_UNIT = 2.0 ** -11  # fp16 unit roundoff
SEED = 0

Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------ export transforms


class MaskedAttention:
    """Drop-in for `engine.ops.attention` in exported graphs: softmax(q·kᵀ/√D + mask)·v, written out so that any
    opset/runtime runs it. q [N, H, Tq, D], k/v [N, H, Tk, D] -> [N, H, Tq, D].

    `mask` ([Tq, Tk] bool, True = attend; None = full) is set per forward by `LMStepGraph`, because the band of a
    stage is a function of graph inputs; the `window` argument the layers pass is therefore ignored."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
        scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))  # [N, H, Tq, Tk]
        if self.mask is not None:
            scores = scores.masked_fill(~self.mask, float("-inf"))  # the diagonal is always kept: no empty row
        # softmax in fp32 (a no-op for fp32 graphs): fp16 exp/sum over long rows loses the small weights
        return torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)


@contextlib.contextmanager
def onnx_attention(lm: LM) -> Iterator[MaskedAttention]:
    """Swap every layer's attention op for `MaskedAttention` (one shared instance for self-attention, whose mask
    the step graph sets, one unmasked for cross-attention); restore the originals on exit."""
    self_attend = MaskedAttention()
    with attention_ops(lm, self_attend, MaskedAttention()):
        yield self_attend


def _onnx_gates(w: torch.Tensor, hidden: int) -> torch.Tensor:
    """PyTorch packs LSTM gates [i, f, g, o], ONNX [i, o, f, c]."""
    i, f, g, o = w.split(hidden, dim=0)
    return torch.cat([i, o, f, g], dim=0)


class OnnxLSTM(nn.Module):
    """An `nn.LSTM` (time-major, unidirectional, zero initial state) emitted as one ONNX LSTM op per layer, so the
    sequence length stays symbolic. Outside `torch.onnx.export` it runs the wrapped LSTM unchanged."""

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        if lstm.bidirectional or lstm.batch_first or lstm.proj_size or not lstm.bias:
            raise ValueError("ONNX export supports the codec's LSTM shape only (unidirectional, time-major, with "
                             "bias, no projection); this codec's LSTM differs")
        self.lstm = lstm
        self.hidden = lstm.hidden_size
        h = self.hidden
        for n in range(lstm.num_layers):
            p = {name: getattr(lstm, f"{name}_l{n}").detach() for name in ("weight_ih", "weight_hh", "bias_ih",
                                                                           "bias_hh")}
            self.register_buffer(f"w{n}", _onnx_gates(p["weight_ih"], h)[None], persistent=False)  # [1, 4H, C]
            self.register_buffer(f"r{n}", _onnx_gates(p["weight_hh"], h)[None], persistent=False)  # [1, 4H, H]
            bias = torch.cat([_onnx_gates(p["bias_ih"], h), _onnx_gates(p["bias_hh"], h)])[None]  # [1, 8H]
            self.register_buffer(f"b{n}", bias, persistent=False)

    def forward(self, x: torch.Tensor, hx: Any = None) -> tuple[torch.Tensor, Any]:
        """x [T, B, C] -> (y [T, B, H], None): callers of the codec use the sequence output only."""
        if not torch.onnx.is_in_onnx_export():
            return self.lstm(x, hx)
        if hx is not None:
            raise ValueError("ONNX export of an LSTM with an initial state is not supported")
        t, b = x.shape[0], x.shape[1]
        for n in range(self.lstm.num_layers):
            y = torch.onnx.ops.symbolic("LSTM", (x, getattr(self, f"w{n}"), getattr(self, f"r{n}"),
                                                 getattr(self, f"b{n}")),
                                        {"hidden_size": self.hidden}, dtype=x.dtype, shape=(t, 1, b, self.hidden))
            x = y.squeeze(1)  # Y [T, num_directions=1, B, H]
        return x, None


@contextlib.contextmanager
def onnx_lstm(module: nn.Module) -> Iterator[None]:
    """Replace every nn.LSTM below `module` with `OnnxLSTM`; restore on exit."""
    swapped = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LSTM):
                setattr(parent, name, OnnxLSTM(child))
                swapped.append((parent, name, child))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def _translations() -> dict[Callable, Any]:
    """Exporter overrides: SymInt `//` with floor semantics (see the module docstring)."""
    from onnxscript.function_libs.torch_lib.ops.core import aten_floor_divide

    return {operator.floordiv: aten_floor_divide}


# ----------------------------------------------------------------------------------------------- input guards

GUARD_RULE = (f"text_encoder, lm_step and codec_decode check their own inputs against these rules (all but the "
              f"guided/unguided choice, which is not an input) and fail the run, before computing anything, at "
              f"the Gather node named {guard_node('<graph>')} (onnxruntime's error "
              f"names it); cross_kv and codec_encode rely on their static dims (dim, channels)")


class Guard(nn.Module):
    """The graph's own input contract, with no clamp: `guard(ok)` gathers index 0 of a one-element zero table when
    the bool scalar `ok` holds and index 1 (out of bounds) when not, so onnxruntime fails the run at that node,
    whose name says so (`stamp`). The int64 zero it returns is added to the graph's inputs, so every other
    node depends on it and runs after it: a bad input fails here, never deeper in the graph or silently."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer(GUARD, torch.zeros(1, dtype=torch.long), persistent=False)

    def forward(self, ok: torch.Tensor) -> torch.Tensor:
        return torch.index_select(getattr(self, GUARD), 0, (~ok).long().reshape(1)).reshape(())  # [] int64 zero


def dim_of(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x.shape[dim] as int64 data, not as a symbolic size: the exporter neither specialises nor unifies it (a sum
    over the other dims, not an index, so that an empty dim elsewhere does not fail first)."""
    other = [d for d in range(x.dim()) if d != dim]
    return torch.ones_like(x.sum(dim=other) if other else x, dtype=torch.long).sum()


def in_range(x: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """All of the integer tensor x in [low, high] (inclusive), as a bool scalar; an empty x passes (its size is
    checked on its own). A zero is appended so that min/max never reduce an empty tensor; low <= 0 <= high."""
    flat = torch.cat([x.flatten(), x.new_zeros(1)])
    return (flat.min() >= low) & (flat.max() <= high)


# ----------------------------------------------------------------------------------------------------- graphs


class TextEncoderGraph(nn.Module):
    """input_ids, attention_mask [1, L] int64 -> text_embeds [1, L, dim] fp32: encoder, the LM's `text_proj`,
    padded positions zeroed (what the LM's cross-attention reads). B stays a dynamic dim so that the guard, not
    onnxruntime's shape check, refuses B > 1."""

    def __init__(self, encoder: nn.Module, proj: nn.Linear, vocab: int, max_tokens: int) -> None:
        super().__init__()
        self.encoder, self.proj, self.vocab, self.max_tokens = encoder, proj, vocab, max_tokens
        self.guard = Guard()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # one prompt per run (manifest client.text.rule): B = 1 is checked, not a static dim, so that a batch fails
        # here, at the named guard; the mask's own dims are kept apart from the ids' (`stamp`)
        length = dim_of(input_ids, 1)
        ok = ((dim_of(input_ids, 0) == 1) & (length >= 1) & (length <= self.max_tokens)
              & (dim_of(attention_mask, 0) == dim_of(input_ids, 0))
              & (dim_of(attention_mask, 1) == length) & in_range(input_ids, 0, self.vocab - 1))
        g = self.guard(ok)
        input_ids, attention_mask = input_ids + g, attention_mask + g
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.proj(states.float()) * attention_mask.unsqueeze(-1).to(torch.float32)


class CrossKVGraph(nn.Module):
    """text_embeds [B, L, dim] fp32 -> (k_0, v_0, k_1, v_1, ...) each [B, H, L, D] in the LM's dtype."""

    def __init__(self, lm: LM) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, text_embeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t for kv in self.lm.cross_kv(text_embeds) for t in kv)


class LMStepGraph(nn.Module):
    """codes [2B, K, T] int64, stage [] int64, k_0, v_0, ... [B, H, L, D] -> logits of codebook `stage`
    [2B, T, V] fp32. As `LM.forward`: the first B rows cross-attend to the text, the rest are unconditional.

    The stage is data here, so the two things `LM.forward` picks with a Python int are picked in the graph: the
    self-attention mask (full for stage 0, |Δt| <= subcodes_context otherwise) and the output head (a gather
    from the stacked head weights, so only one head is computed)."""

    def __init__(self, lm: LM, self_attend: MaskedAttention) -> None:
        super().__init__()
        self.lm, self.self_attend = lm, self_attend
        self.window = lm.cfg.window(1)  # band for stages >= 1; None: the model attends fully at every stage
        self.register_buffer("heads", torch.stack([h.weight.detach() for h in lm.linears]), persistent=False)
        self.guard = Guard()

    def contract(self, codes: torch.Tensor, stage: torch.Tensor, cross: Sequence[torch.Tensor]) -> torch.Tensor:
        """The step's input contract as a bool scalar (manifest client.boundary.lm_step): codes in [0, mask_id],
        stage in [0, K), 1 <= T <= max_frames, every cross k/v with the rows B and text length of cross_k_0, and
        N = B (unguided) or 2B (guided)."""
        cfg = self.lm.cfg
        n, t, b, length = dim_of(codes, 0), dim_of(codes, 2), dim_of(cross[0], 0), dim_of(cross[0], 2)
        ok = in_range(codes, 0, cfg.card) & (stage >= 0) & (stage < cfg.n_q)
        ok = ok & (t >= 1) & (t <= cfg.max_frames) & ((n == b) | (n == 2 * b))
        for kv in cross[1:]:
            ok = ok & (dim_of(kv, 0) == b) & (dim_of(kv, 2) == length)
        return ok

    def forward(self, codes: torch.Tensor, stage: torch.Tensor, *cross: torch.Tensor) -> torch.Tensor:
        g = self.guard(self.contract(codes, stage, cross))
        codes, stage = codes + g, stage + g
        if self.window is not None:
            self.self_attend.mask = band_mask(codes.shape[-1], self.window, codes.device) | (stage == 0)  # [T, T]
        kv = [(cross[2 * i], cross[2 * i + 1]) for i in range(len(self.lm.layers))]
        x = self.lm.hidden(self.lm.embed(codes), Dense(kv, None))  # fp32 residual; the mask picks the band
        head = torch.index_select(self.heads, 0, stage.reshape(1)).squeeze(0)  # [V, dim]
        return F.linear(self.lm.out_norm(x.float()), head)


class CodecDecodeGraph(nn.Module):
    """codes [B, K, T] int64 -> audio [B, 1, T·hop] fp32 (the codec's decode without its host-side checks)."""

    def __init__(self, codec: nn.Module) -> None:
        super().__init__()
        self.codec = codec
        self.guard = Guard()

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        ok = in_range(codes, 0, int(self.codec.config.bins) - 1) & (dim_of(codes, 2) >= 1)
        codes = codes + self.guard(ok)
        return self.codec.decoder(self.codec.quantizer.decode(codes))


class CodecEncodeGraph(nn.Module):
    """audio [B, 1, S] fp32 -> codes [B, K, ceil(S / hop)] int64."""

    def __init__(self, codec: nn.Module) -> None:
        super().__init__()
        self.codec = codec

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.codec.quantizer.encode(self.codec.encoder(audio))


def cross_names(num_layers: int) -> list[str]:
    """Graph names of the per-layer cross-attention tensors, in the order LMStepGraph takes them."""
    return [f"cross_{kv}_{i}" for i in range(num_layers) for kv in ("k", "v")]


# ----------------------------------------------------------------------------------------------------- export


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter prints progress, FutureWarnings and 'torchvision is not installed' lines; keep the CLI clean
    (failures still raise, with the exporter's message)."""
    names = ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes", "onnxscript")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic_shapes: tuple, opset: int | None) -> float:
    """torch.export-based ONNX export (dynamo=True) of one graph to `path`; -> seconds taken."""
    for stale in path.parent.glob(path.name + "*"):  # an old GRAPH.onnx.data must not outlive its graph
        stale.unlink()
    t0 = time.perf_counter()
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(module.eval(), args, dynamo=True, dynamic_shapes=dynamic_shapes,
                                    input_names=input_names, output_names=output_names, opset_version=opset,
                                    custom_translation_table=_translations(), optimize=True, verbose=False)
        program.save(str(path))  # weights go to GRAPH.onnx.data only past protobuf's 2 GB limit
    return time.perf_counter() - t0


def _session(path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: shape-merge warnings on dynamic dims are expected
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _io(session: Any) -> tuple[list[dict], list[dict]]:
    spec = [[{"name": v.name, "type": v.type, "shape": list(v.shape)} for v in vs]
            for vs in (session.get_inputs(), session.get_outputs())]
    return spec[0], spec[1]


def _files(out: Path, name: str) -> list[dict[str, Any]]:
    return [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(out.glob(name + "*")) if p.is_file()]


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _tolerance(ref_max: float, fp16_err: float | None) -> float:
    """fp32: FP32_TOL, scaled by the output's magnitude when that exceeds 1 (rounding error is relative).
    fp16: twice the error torch's own fp16 model makes against fp32 on the same inputs, plus 4 fp16 ulps of the
    output's scale; i.e. the ONNX graph may differ from fp32 about as much as fp16 itself does."""
    if fp16_err is None:
        return FP32_TOL * max(1.0, ref_max)
    return 2.0 * fp16_err + 4.0 * FP16_UNIT * max(1.0, ref_max)


def _compare(got: Sequence[np.ndarray], want: Sequence[torch.Tensor], cases: list[dict],
             case: dict, fp16: Sequence[torch.Tensor] | None = None) -> None:
    """Record one check case: max |got - want| over all outputs, the reference's scale and the tolerance."""
    err = max(float(np.abs(g.astype(np.float64) - w.double().numpy()).max()) for g, w in zip(got, want))
    ref = max(float(w.abs().max()) for w in want)
    e16 = None
    if fp16 is not None:
        e16 = max(float((a.double() - w.double()).abs().max()) for a, w in zip(fp16, want))
    tol = _tolerance(ref, e16)
    cases.append({**case, "max_abs_err": err, "max_abs_ref": ref, "tol": tol, "passed": err <= tol,
                  **({"torch_fp16_err": e16} if e16 is not None else {})})


def _summary(cases: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {"passed": all(c["passed"] for c in cases), "cases": cases}
    if cases and "max_abs_err" in cases[0]:
        out["max_abs_err"] = max(c["max_abs_err"] for c in cases)
    return out


def _random_codes(g: torch.Generator, shape: tuple[int, ...], card: int, mask_id: int | None) -> torch.Tensor:
    codes = torch.randint(0, card, shape, generator=g)
    if mask_id is not None:  # about half the positions masked, as mid-decoding
        codes = codes.masked_fill(torch.rand(shape, generator=g) < 0.5, mask_id)
    return codes


def _source_info(model: str | Path, text_encoder: str | Path | None, cfg: ModelConfig) -> dict[str, Any]:
    """sha256 of the checkpoint files, and where the text encoder came from (as `magnet_engine.load` picks it)."""
    from magnet_engine.engine.loading import checkpoint_files

    paths = checkpoint_files(model)
    files = {p.name: {"path": str(p.resolve()), "sha256": sha256_file(p)} for p in paths}
    if text_encoder is None:
        beside = paths[0].parent / "t5"  # audiocraft format: a t5/ folder beside the LM, as engine.load picks it
        text_encoder = beside if beside.is_dir() else cfg.text_encoder
    te: dict[str, Any] = {"source": str(text_encoder)}
    if Path(text_encoder).is_dir():
        te["files"] = {p.name: sha256_file(p) for p in sorted(Path(text_encoder).iterdir()) if p.is_file()}
    return {"model": str(model), "files": files, "text_encoder": te}


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "onnxscript": onnxscript.__version__,
            "transformers": transformers.__version__}


def export_model(model: str | Path, out: str | Path, text_encoder: str | Path | None = None, dtype: str = "float32",
                 opset: int | None = None, *, quantize: str | None = None, conformance: bool = False,
                 log: Log | None = None) -> dict[str, Any]:
    """Export `model` (a folder, an LM package file or a Hugging Face id, as `magnet_engine.load` takes) to `out`.

    Writes the five graphs, the tokenizer and `manifest.json` (returned). `dtype` float16 exports the transformer
    layers (cross_kv, lm_step) in fp16; text encoder and codec stay fp32, as the engine runs them. Every graph is
    run through onnxruntime (CPU) on random inputs of other shapes than the export's and compared with the PyTorch
    path; if any disagrees beyond tolerance, ExportCheckError (a ValueError) is raised and no manifest is written.
    `quantize` "int8": after the checks, lm_step, cross_kv and text_encoder are quantized (export.quantize; the
    codec stays fp32) and the manifest records it. `conformance`: write conformance/ (export.conformance), after
    quantizing if asked. `log` receives one line per phase (the CLI prints them to stderr).
    """
    from magnet_engine.engine.backends import load

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"unknown quantization {quantize!r}: choose one of {list(QUANTIZE)}")
    if quantize is not None and dtype != "float32":
        raise ValueError("--quantize int8 quantizes the float32 graphs; drop --dtype float16 (a CUDA option)")
    if opset is not None and (not isinstance(opset, int) or opset < MIN_OPSET):
        raise ValueError(f"opset {opset!r} is too old for the exporter: pass --opset {MIN_OPSET} or higher")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder (it is created if missing)")
    say = log or (lambda msg: None)
    say(f"loading {model}")
    eng = load(model, text_encoder=text_encoder, device="cpu", dtype="float32")
    if eng.config.kind != "magnet" or eng.lm is None:
        raise ValueError(f"ONNX export supports MAGNeT models; {model} is a {eng.config.kind} model")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a failed export must not leave a valid-looking dir behind

    x = _Exporter(eng, out, dtype, opset, say)
    x.export_cross_kv()  # first: the cheapest graph, so a broken setup fails fast
    x.export_lm_step()
    x.export_text_encoder()
    x.export_codec()
    tok_check = x.save_tokenizer()
    cfg, codec_cfg = eng.config, eng.codec.config
    codec = {"sample_rate": int(codec_cfg.sample_rate), "hop_length": int(codec_cfg.hop_length),
             "frame_rate": int(codec_cfg.frame_rate), "n_q": int(codec_cfg.n_q), "bins": int(codec_cfg.bins),
             "channels": int(getattr(codec_cfg, "channels", 1))}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "opset": x.graphs["lm_step"]["opset"],
        "created_with": _versions(),
        "source": _source_info(model, text_encoder, cfg),
        "model_config": cfg.to_dict(),
        # the model's own decoding defaults (as config.json's "generation"), so the ORT engine decodes like the source
        "generation": eng.default_generation().overrides(default_generation(cfg)),
        "codec": codec,
        "tokenizer": TOKENIZER_DIR,
        "tokenizer_check": tok_check,
        "cross_kv_names": x.kv_names,
        "graphs": {name: x.graphs[name] for name in GRAPHS},
        "quantization": None,
        "client": client_contract(cfg, eng.default_generation(), codec, *text_limits(eng.text.encoder), GUARD_RULE),
    }
    text_json = json.dumps(manifest, indent=2) + "\n"
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(text_json)
    os.replace(tmp, out / MANIFEST)  # atomic: the manifest appears only once everything is in place
    result = json.loads(text_json)  # exactly what a reader of manifest.json sees (tuples become lists)
    if quantize is not None:  # rewrites three graphs, records "quantization", writes the manifest again
        result = quantize_export(out, result, quantize, log=say)
    if conformance:
        from . import conformance as vectors
        from .ort import load_engine

        say("writing conformance vectors")
        vectors.write(out, load_engine(out))
    return result


class _Exporter:
    """One export: each method exports a graph (inside its export transform), then checks it against the engine's
    PyTorch path once the transform is undone, and records both in `graphs`."""

    def __init__(self, eng: Any, out: Path, dtype: str, opset: int | None, say: Log) -> None:
        self.out, self.dtype, self.opset, self.say = out, dtype, opset, say
        self.cfg: ModelConfig = eng.config
        self.lm: LM = eng.lm.eval()  # fp32: the reference
        # the exported LM; in fp16 it is also torch's own fp16 path, whose error sets the fp16 tolerance
        self.lm_x = self.lm if dtype == "float32" else copy.deepcopy(self.lm).to_dtype(DTYPES[dtype]).eval()
        self.lm16 = None if dtype == "float32" else self.lm_x
        self.text, self.codec = eng.text, eng.codec
        self.g = torch.Generator().manual_seed(SEED)
        self.graphs: dict[str, dict[str, Any]] = {}
        self.kv_names = cross_names(self.cfg.num_layers)
        Dim = torch.export.Dim
        self.batch, self.text_len = Dim("batch", min=1), Dim("text_len", min=1)
        self.max_t = max(self.cfg.max_frames, 2)
        self.frames = Dim("frames", min=1, max=self.max_t)
        # example sizes: >= 2 (1 specialises) and pairwise different (equal sizes may be unified by the tracer)
        self.b_ex, self.l_ex, self.t_ex = 3, 7, min(self.max_t, 13)

    def export_one(self, name: str, module: nn.Module, args: tuple, inputs: list[str], outputs: list[str],
                   dyn: tuple, axes: dict[str, list[int | None]], graph_dtype: str,
                   meta: dict[str, int] | None = None) -> None:
        path = self.out / f"{name}.onnx"
        self.say(f"exporting {name}")
        seconds = _export(module, args, path, inputs, outputs, dyn, self.opset)
        stamp(path, meta or {}, name)
        self.graphs[name] = {"file": path.name, "files": _files(self.out, path.name), "dtype": graph_dtype,
                             "dynamic_axes": axes, "opset": _opset(path), "export_seconds": round(seconds, 2)}

    def check_one(self, name: str, check: Callable[[Any], dict[str, Any]]) -> None:
        session = _session(self.out / self.graphs[name]["file"])
        ins, outs = _io(session)
        result = check(session)
        self.graphs[name].update(inputs=ins, outputs=outs, check=result)
        if not result["passed"]:
            bad = [c for c in result["cases"] if not c["passed"]]
            raise ExportCheckError(f"{name}.onnx does not match PyTorch: {json.dumps(bad)[:800]}; the export is "
                                   "refused (no manifest written). Report this with the versions of torch, onnx, "
                                   "onnxscript and onnxruntime")
        self.say(f"  {name}: check passed ({_brief(result)})")

    def export_cross_kv(self) -> None:
        """text_embeds [B, L, dim] -> per-layer k, v [B, H, L, D]: once per request."""
        cfg, g = self.cfg, self.g
        self.export_one("cross_kv", CrossKVGraph(self.lm_x), (torch.randn(self.b_ex, self.l_ex, cfg.dim, generator=g),),
                        ["text_embeds"], self.kv_names, ({0: self.batch, 1: self.text_len},),
                        {"batch": [1, None], "text_len": [1, None]}, self.dtype)

        def check(sess: Any) -> dict[str, Any]:
            cases: list[dict] = []
            for b, n in ((2, 9), (1, 3)):
                cond = torch.randn(b, n, cfg.dim, generator=g)
                with torch.no_grad():
                    want = [t.float() for kv in self.lm.cross_kv(cond) for t in kv]
                    half = None if self.lm16 is None else [t.float() for kv in self.lm16.cross_kv(cond) for t in kv]
                got = sess.run(None, {"text_embeds": cond.numpy()})
                _compare(got, want, cases, {"batch": b, "text_len": n}, half)
            return _summary(cases)

        self.check_one("cross_kv", check)

    def export_lm_step(self) -> None:
        """codes [2B, K, T], stage, cross k/v -> logits [2B, T, V]: once per decoding step."""
        cfg, g, lm, lm_x = self.cfg, self.g, self.lm, self.lm_x
        with onnx_attention(lm_x) as self_attend, torch.no_grad():
            kv_ex = tuple(t for kv in lm_x.cross_kv(torch.randn(self.b_ex, self.l_ex, cfg.dim, generator=g))
                          for t in kv)
            codes_ex = _random_codes(g, (2 * self.b_ex, cfg.n_q, self.t_ex), cfg.card, cfg.card)
            kv_dims = tuple({0: self.batch, 2: self.text_len} for _ in self.kv_names)
            self.export_one("lm_step", LMStepGraph(lm_x, self_attend), (codes_ex, torch.tensor(1), *kv_ex),
                            ["codes", "stage", *self.kv_names], ["logits"],
                            ({0: 2 * self.batch, 2: self.frames}, None, kv_dims),
                            {"batch": [1, None], "frames": [1, self.max_t], "text_len": [1, None]}, self.dtype,
                            step_meta(cfg))

        def check(sess: Any) -> dict[str, Any]:
            cases: list[dict] = []
            for b, t, n in ((2, cfg.max_frames, 9), (1, min(7, cfg.max_frames), 3)):
                cond = torch.randn(b, n, cfg.dim, generator=g)
                codes = _random_codes(g, (2 * b, cfg.n_q, t), cfg.card, cfg.card)
                with torch.no_grad():
                    cross, cross_x = lm.cross_kv(cond), lm_x.cross_kv(cond)
                    kv = [u.numpy() for pair in cross_x for u in pair]
                    feeds = {"codes": codes.numpy(), **dict(zip(self.kv_names, kv))}
                    for stage in range(cfg.n_q):
                        want = lm(codes, stage, cross)
                        half = None if self.lm16 is None else [self.lm16(codes, stage, cross_x)]
                        got = sess.run(["logits"], {**feeds, "stage": np.array(stage, dtype=np.int64)})
                        _compare(got, [want], cases, {"batch": b, "frames": t, "text_len": n, "stage": stage}, half)
            return _summary(cases)

        self.check_one("lm_step", check)

    def export_text_encoder(self) -> None:
        """input_ids, attention_mask [1, L] -> text_embeds [1, L, dim]; fp32, as the engine runs it."""
        g, encoder, proj = self.g, self.text.encoder, self.text.proj
        vocab, max_tokens = text_limits(encoder)
        ids_ex = torch.randint(2, vocab, (self.b_ex, self.l_ex), generator=g)
        dims = {0: self.batch, 1: self.text_len}
        self.export_one("text_encoder", TextEncoderGraph(encoder, proj, vocab, max_tokens),
                        (ids_ex, torch.ones_like(ids_ex)),
                        ["input_ids", "attention_mask"], ["text_embeds"], (dims, dims),
                        {"batch": [1, None], "text_len": [1, None]}, "float32")

        def check(sess: Any) -> dict[str, Any]:
            cases: list[dict] = []
            te = TextEncoderGraph(encoder, proj, vocab, max_tokens).eval()
            for n in (9, 4):  # one prompt per run, as the contract and the guard have it
                ids, mask = torch.randint(2, vocab, (1, n), generator=g), torch.ones(1, n, dtype=torch.long)
                with torch.no_grad():
                    want = te(ids, mask)
                got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
                _compare(got, [want], cases, {"batch": 1, "text_len": n})
            return _summary(cases)

        self.check_one("text_encoder", check)

    def export_codec(self) -> None:
        """codec_decode: codes [B, K, T] -> audio; codec_encode: audio [B, 1, S] -> codes. fp32."""
        g, codec = self.g, self.codec
        k, bins, hop = int(codec.config.n_q), int(codec.config.bins), int(codec.config.hop_length)
        codec_frames, samples = torch.export.Dim("frames", min=1), torch.export.Dim("samples", min=1)
        with onnx_lstm(codec):
            self.export_one("codec_decode", CodecDecodeGraph(codec),
                            (_random_codes(g, (self.b_ex, k, self.t_ex), bins, None),), ["codes"], ["audio"],
                            ({0: self.batch, 2: codec_frames},), {"batch": [1, None], "frames": [1, None]}, "float32")

        def check_decode(sess: Any) -> dict[str, Any]:
            cases: list[dict] = []
            for b, t in ((2, self.cfg.max_frames), (1, 3)):
                codes = _random_codes(g, (b, k, t), bins, None)
                got = sess.run(None, {"codes": codes.numpy()})
                _compare(got, [codec.decode(codes)], cases, {"batch": b, "frames": t})
            return _summary(cases)

        self.check_one("codec_decode", check_decode)

        with onnx_lstm(codec):
            self.export_one("codec_encode", CodecEncodeGraph(codec),
                            (0.1 * torch.randn(self.b_ex, 1, self.t_ex * hop + 7, generator=g),), ["audio"],
                            ["codes"], ({0: self.batch, 2: samples},), {"batch": [1, None], "samples": [1, None]},
                            "float32")

        def check_encode(sess: Any) -> dict[str, Any]:
            """Codes are discrete: they must be identical."""
            cases: list[dict] = []
            # lengths off the hop grid: the last frame is partial, which exercises the ceil-padding arithmetic
            for b, s in ((2, 5 * hop + hop // 3), (1, hop - 1), (1, 2 * hop)):
                audio = 0.1 * torch.randn(b, 1, s, generator=g)
                want = codec.encode(audio)
                got = sess.run(None, {"audio": audio.numpy()})[0]
                same = got.shape == tuple(want.shape)
                wrong = int((got != want.numpy()).sum()) if same else int(want.numel())
                cases.append({"batch": b, "samples": s, "frames": int(want.shape[-1]), "mismatched_codes": wrong,
                              "passed": same and wrong == 0})
            return _summary(cases)

        self.check_one("codec_encode", check_encode)

    def save_tokenizer(self) -> dict[str, Any]:
        """Save the tokenizer beside the graphs (the backend needs no torch model) and check that it tokenizes as
        the original does."""
        tok_dir = self.out / TOKENIZER_DIR
        if tok_dir.exists():
            shutil.rmtree(tok_dir)
        self.text.tokenizer.save_pretrained(str(tok_dir))
        _no_padding(tok_dir / "tokenizer.json")
        result = _check_tokenizer(self.text.tokenizer, tok_dir)
        if not result["passed"]:
            raise ExportCheckError(f"the saved tokenizer in {tok_dir} tokenizes differently from the original "
                                   f"({result}); the export is refused")
        return result


T5_MAX_TOKENS = 512  # T5's relative positions take any length; it was trained on 512 tokens, the export's limit


def text_limits(encoder: nn.Module) -> tuple[int, int]:
    """-> (vocabulary, most tokens per prompt) of a text encoder: BERT-like encoders' absolute positions cap the
    prompt; T5 takes T5_MAX_TOKENS (the torch engine encodes longer prompts, the export refuses them)."""
    cfg = getattr(encoder, "config", None)
    vocab = int(getattr(cfg, "vocab_size", 32))
    if getattr(cfg, "model_type", "t5") == "t5":
        return vocab, T5_MAX_TOKENS
    return vocab, int(getattr(cfg, "max_position_embeddings", T5_MAX_TOKENS))


def _brief(result: dict[str, Any]) -> str:
    if "max_abs_err" in result:
        return f"max abs err {result['max_abs_err']:.2e}"
    return f"{sum(c.get('frames', 0) for c in result['cases'])} frames, codes identical"


def step_meta(cfg: ModelConfig) -> dict[str, int]:
    """lm_step.onnx's metadata: what `export.ort` checks a step's inputs against, read from the graph itself."""
    return {"max_frames": cfg.max_frames, "codebooks": cfg.n_q, "mask_id": cfg.card}


def _no_padding(path: Path) -> None:
    """Switch off the padding and truncation a tokenizer.json may carry (MiniLM's pads and truncates to 128):
    `tokenizers` in other languages honour them, while the engine encodes each prompt unpadded."""
    if not path.is_file():
        raise ValueError(f"the text tokenizer saved no {path.name} (a slow tokenizer?); clients need the fast "
                         "tokenizer's tokenizer.json: use a text encoder with a fast tokenizer")
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["padding"], spec["truncation"] = None, None
    path.write_text(json.dumps(spec, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


PROBES = ("", "slow sad piano", "upbeat electronic dance track with a heavy bass line at 128 bpm",
          "Jazz, 90 BPM; saxophone & brushes — late night", "  Ünïcode  cafés, 東京 and emoji 🎷 " + "very " * 200)


def _check_tokenizer(original: Any, saved_dir: Path) -> dict[str, Any]:
    """The saved tokenizer, through transformers and through the bare tokenizer.json (what other languages read),
    gives the original's ids; the long probe shows no truncation happens."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(saved_dir))
    bare = Tokenizer.from_file(str(saved_dir / "tokenizer.json"))
    same = all(original(p)["input_ids"] == saved(p)["input_ids"] == bare.encode(p).ids for p in PROBES)
    return {"passed": same, "probes": len(PROBES)}
