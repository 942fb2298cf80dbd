"""The onnxruntime backend: an `engine.api.Engine` whose text conditioner, step function and codec run exported
graphs, around the engine's own decoding loop (`Engine.generate` -> `magnet.decode_step`).

    eng = load_engine("out/magnet-small-onnx")           # CPU execution provider
    eng = load_engine("out/magnet-small-onnx", "cuda")   # CUDA EP + IO binding (needs onnxruntime-gpu)
    codes = eng.generate(["80s synth pop"], greedy=True).codes

Per request: the text graph once per *new* prompt (LRU-cached, as `engine.text.TextConditioner`, which is reused),
`cross_kv` once, then one `lm_step` call per decoding step. Nothing here needs the torch model or its weights.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from magnet_engine.engine.api import Engine, parse_device
from magnet_engine.engine.codec import check_codes, check_wav
from magnet_engine.engine.config import GenerationConfig, ModelConfig, SettingError, default_generation
from magnet_engine.engine.magnet import Step, pick_frames, split_rows, step_rows
from magnet_engine.engine.text import CACHE_SIZE, TextConditioner
from torch import nn

from .manifest import GRAPHS, is_export, read_manifest, reexport_hint

_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def _ort_errors() -> tuple[type[BaseException], ...]:
    """onnxruntime's pybind exceptions derive from Exception directly; name them so nothing else is swallowed."""
    from onnxruntime.capi import onnxruntime_pybind11_state as s

    names = ("Fail", "InvalidProtobuf", "InvalidGraph", "NoSuchFile", "RuntimeException", "InvalidArgument",
             "NotImplemented", "NoModel", "ModelLoaded", "EPFail")
    return tuple(getattr(s, n) for n in names if hasattr(s, n)) + (RuntimeError, OSError)


@dataclass(frozen=True)
class CodecInfo:
    """What the engine and callers read from a codec's `.config` (from the manifest)."""

    sample_rate: int
    hop_length: int
    frame_rate: int
    n_q: int
    bins: int
    channels: int = 1


@dataclass(frozen=True)
class StepLimits:
    """What lm_step accepts, from its own metadata (written at export): frames, codebooks, the mask id."""

    max_frames: int
    codebooks: int
    mask_id: int
    dim: int  # width of text_embeds, from cross_kv's input

    @classmethod
    def of(cls, cross_kv: Any, lm_step: Any) -> StepLimits:
        meta = lm_step.get_modelmeta().custom_metadata_map
        try:
            return cls(int(meta["max_frames"]), int(meta["codebooks"]), int(meta["mask_id"]),
                       int(cross_kv.get_inputs()[0].shape[-1]))
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"lm_step.onnx lacks its limits metadata ({e}); re-export it with `magnet export`") from e


# ------------------------------------------------------------------------ the boundary (manifest client.boundary)


def _int64(name: str, x: Any, rank: int, layout: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.int64:
        raise TypeError(f"{name} must be an int64 numpy array {layout}, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim != rank:
        raise ValueError(f"{name} must be {layout}, got shape {list(x.shape)}")
    return x


def _values_in(name: str, x: np.ndarray, low: int, high: int, meaning: str) -> None:
    if x.size and (int(x.min()) < low or int(x.max()) > high):
        bad = int(x.min()) if int(x.min()) < low else int(x.max())
        raise ValueError(f"{name} must lie in [{low}, {high}] ({meaning}), found {bad}")


def check_text_ids(input_ids: Any, attention_mask: Any, max_tokens: int, vocab: int) -> None:
    """text_encoder's boundary: one prompt's ids and mask [1, l], the same shape, 1 <= l <= max_tokens."""
    ids = _int64("input_ids", input_ids, 2, "[1, l]")
    mask = _int64("attention_mask", attention_mask, 2, "[1, l]")
    if ids.shape != mask.shape:
        raise ValueError(f"input_ids {list(ids.shape)} and attention_mask {list(mask.shape)} differ in shape; give "
                         "one mask entry per token")
    if ids.shape[0] != 1:
        raise ValueError(f"text_encoder takes one prompt per run ([1, l]), got {ids.shape[0]} rows; encode each "
                         "prompt alone and zero-pad (manifest client.text.rule)")
    if not 1 <= ids.shape[1] <= max_tokens:
        raise ValueError(f"a prompt of {ids.shape[1]} tokens; the text encoder takes 1 to {max_tokens}: "
                         f"{'shorten it' if ids.shape[1] else 'tokenize with the special tokens (EOS)'}")
    _values_in("input_ids", ids, 0, vocab - 1, "the tokenizer's vocabulary")


def check_cross_kv(kv: Sequence[Any], names: Sequence[str], batch: int) -> None:
    """lm_step's text inputs: one cross_kv run's outputs, each [B, H, L, D] with the prompts' B and one L."""
    if len(kv) != len(names):
        raise ValueError(f"{len(kv)} cross k/v tensors for {len(names)} inputs ({', '.join(names)}); pass all of "
                         "one cross_kv run's outputs")
    first = kv[0].shape
    for name, x in zip(names, kv):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be [B, H, L, D], got {list(getattr(x, 'shape', []))}")
        if x.shape[0] != batch:
            raise ValueError(f"{name} has {x.shape[0]} rows for {batch} prompts: cross k/v hold the prompts' rows "
                             "only (the unconditional rows are the codes' rows past them; never pass [cond; null])")
        if x.shape != first:
            raise ValueError(f"{name} is {list(x.shape)}, {names[0]} is {list(first)}: every k/v must come from "
                             "one cross_kv run")


def check_lm_step(codes: Any, stage: Any, kv: Sequence[Any], names: Sequence[str], guided: bool,
                  limits: StepLimits) -> None:
    """lm_step's whole boundary on numpy inputs: codes [N, K, T] with N = 2B guided or B unguided, B = the k/v
    rows; values, frames and stage in range; the k/v of one cross_kv run."""
    k, max_t = limits.codebooks, limits.max_frames
    codes = _int64("codes", codes, 3, f"[N, {k}, T]")
    n = codes.shape[0]
    batch = n // 2 if guided else n
    if codes.shape[1] != k:
        raise ValueError(f"codes must be [N, {k}, T] ({k} codebooks), got {list(codes.shape)}")
    if n < 1 or (guided and n % 2):
        raise ValueError(f"a guided step's codes hold [cond; uncond] = 2B rows, got {n}")
    kv_rows = getattr(kv[0], "shape", [None])[0] if kv else None
    if kv_rows is not None and kv_rows != batch and n in (kv_rows, 2 * kv_rows):
        raise ValueError(f"cross k/v have {kv_rows} rows for {'a guided' if guided else 'an unguided'} step of {n} "
                         f"codes rows: they must have {batch} (the prompts' own rows; never pass [cond; null])")
    if kv_rows is not None and n not in (kv_rows, 2 * kv_rows):
        raise ValueError(f"codes have {n} rows against cross k/v of {kv_rows}: lm_step takes {kv_rows} (unguided) "
                         f"or {2 * kv_rows} (guided: [cond; uncond])")
    check_cross_kv(kv, names, batch)
    if not 1 <= codes.shape[2] <= max_t:
        raise ValueError(f"codes have {codes.shape[2]} frames; lm_step takes 1 to {max_t} (the model's segment): "
                         "generate a long piece window by window (manifest client.longform)")
    if isinstance(stage, bool) or not isinstance(stage, (int, np.integer)) or not 0 <= stage < k:
        raise ValueError(f"stage must be an int in [0, {k}) (the codebook being decoded), got {stage!r}")
    _values_in("codes", codes, 0, limits.mask_id, f"tokens, or {limits.mask_id} = masked")


class Graphs:
    """The graphs' CPU calls on numpy arrays, each checked at the boundary first (manifest client.boundary): the
    Python client's refusals, one line each, before onnxruntime runs anything. OrtStep, OrtCodec and the text
    encoder of `load_engine` call the graphs through it."""

    def __init__(self, sessions: dict[str, Any], manifest: dict[str, Any]) -> None:
        self.sessions, self.kv_names = sessions, list(manifest["cross_kv_names"])
        limits = manifest["client"]["limits"]
        self.max_tokens, self.text_vocab = int(limits["text_tokens_max"]), int(limits["text_ids"][1]) + 1
        self.codec_vocab, self.codebooks = int(limits["codec_codes"][1]) + 1, int(manifest["client"]["codebooks"])
        self.limits = StepLimits.of(sessions["cross_kv"], sessions["lm_step"])

    def text_encoder(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """[1, l] int64 x2 -> text_embeds [1, l, dim] fp32."""
        check_text_ids(input_ids, attention_mask, self.max_tokens, self.text_vocab)
        return self.sessions["text_encoder"].run(["text_embeds"], {"input_ids": input_ids,
                                                                   "attention_mask": attention_mask})[0]

    def cross_kv(self, text_embeds: np.ndarray) -> list[np.ndarray]:
        """[B, L, dim] fp32 -> cross_k_i, cross_v_i [B, H, L, D] per layer."""
        dim = self.limits.dim
        if not isinstance(text_embeds, np.ndarray) or text_embeds.dtype != np.float32:
            raise TypeError(f"text_embeds must be a float32 numpy array [B, L, {dim}], got "
                            f"{getattr(text_embeds, 'dtype', type(text_embeds).__name__)}")
        if text_embeds.ndim != 3 or min(text_embeds.shape[:2]) < 1 or text_embeds.shape[2] != dim:
            raise ValueError(f"text_embeds must be [B, L, {dim}] with B, L >= 1, got {list(text_embeds.shape)}")
        return self.sessions["cross_kv"].run(self.kv_names, {"text_embeds": text_embeds})

    def lm_step(self, codes: np.ndarray, stage: int, kv: Sequence[np.ndarray], guided: bool) -> np.ndarray:
        """codes [N, K, T] (N = 2B guided, B not), stage, the k/v [B, H, L, D] -> logits [N, T, V] fp32."""
        check_lm_step(codes, stage, kv, self.kv_names, guided, self.limits)
        feeds = {**dict(zip(self.kv_names, kv)), "codes": codes, "stage": np.array(stage, dtype=np.int64)}
        return self.sessions["lm_step"].run(["logits"], feeds)[0]

    def codec_decode(self, codes: np.ndarray) -> np.ndarray:
        """codes [B, K, T] in [0, vocab) -> audio [B, 1, T·hop] fp32."""
        k = self.codebooks
        codes = _int64("codes", codes, 3, f"[B, {k}, T]")
        if codes.shape[0] < 1 or codes.shape[1] != k or codes.shape[2] < 1:
            raise ValueError(f"codes to decode must be [B, {k}, T] with B, T >= 1, got {list(codes.shape)}")
        _values_in("codes", codes, 0, self.codec_vocab - 1, f"finished tokens; {self.codec_vocab} is the mask id")
        return self.sessions["codec_decode"].run(["audio"], {"codes": codes})[0]


def check_text_embeds(cond: Any, limits: StepLimits) -> None:
    """The cross_kv boundary: text embeddings [B, L, dim] floating point."""
    if not isinstance(cond, torch.Tensor) or not cond.is_floating_point():
        raise TypeError(f"text embeddings must be a float torch.Tensor [B, L, {limits.dim}], got "
                        f"{getattr(cond, 'dtype', type(cond).__name__)}; pass Engine.text(prompts)")
    if cond.dim() != 3 or cond.shape[0] < 1 or cond.shape[1] < 1 or cond.shape[2] != limits.dim:
        raise ValueError(f"text embeddings must be [B, L, {limits.dim}] with B, L >= 1, got {list(cond.shape)}; "
                         "pass Engine.text(prompts)")


def check_step_inputs(codes: Any, stage: Any, batch: int, limits: StepLimits) -> None:
    """The lm_step boundary: codes [B, K, T] int64 with B the text's batch, 1 <= T <= the segment's frames, values
    in [0, mask_id] (checked on CPU tensors only: a GPU check would sync every step), stage an int in [0, K).
    Raises TypeError/ValueError saying what to pass, instead of onnxruntime failing inside the graph."""
    k, max_t = limits.codebooks, limits.max_frames
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int64:
        raise TypeError(f"codes must be a torch.int64 tensor [B, {k}, T], got "
                        f"{getattr(codes, 'dtype', type(codes).__name__)}; convert with codes.long()")
    if codes.dim() != 3 or codes.shape[0] != batch or codes.shape[1] != k:
        raise ValueError(f"codes must be [{batch}, {k}, T] (the text's batch of {batch}, {k} codebooks), got "
                         f"{list(codes.shape)}")
    if not 1 <= codes.shape[2] <= max_t:
        raise ValueError(f"codes have {codes.shape[2]} frames; this export takes 1 to {max_t} frames (the model's "
                         "segment): ask for a shorter duration")
    if isinstance(stage, bool) or not isinstance(stage, (int, np.integer)) or not 0 <= stage < k:
        raise ValueError(f"stage must be an int in [0, {k}) (the codebook being decoded), got {stage!r}")
    if codes.device.type == "cpu" and codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi > limits.mask_id:
            raise ValueError(f"codes must lie in [0, {limits.mask_id}] (tokens, or {limits.mask_id} = masked), "
                             f"found {lo if lo < 0 else hi}")


class OrtCodec:
    """EnCodec through `codec_decode.onnx` / `codec_encode.onnx`; same interface as `engine.codec.Encodec`.

    Runs through host memory even on CUDA: once per request, and the audio goes to the host anyway."""

    def __init__(self, graphs: Graphs, encode: Any, info: CodecInfo, device: torch.device) -> None:
        self.graphs, self._encode, self.config, self.device = graphs, encode, info, device

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T] integer in [0, bins) -> audio [B, 1, T·hop] fp32 on the engine's device."""
        check_codes(codes, self.config.n_q, self.config.bins)
        audio = self.graphs.codec_decode(codes.detach().cpu().long().numpy())
        return torch.from_numpy(audio).to(self.device)

    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [B, 1, S] at `sample_rate` -> codes [B, K, ceil(S / hop)] int64 on the engine's device."""
        check_wav(audio, self.config.channels)
        codes = self._encode.run(["codes"], {"audio": audio.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(codes).to(self.device)


class _OrtTextEncoder:
    """Stands in for the Hugging Face encoder inside `TextConditioner`: runs text_encoder.onnx, which already
    applies the LM's text projection (hence `_Projected` as the conditioner's projection)."""

    def __init__(self, graphs: Graphs, device: torch.device) -> None:
        self.graphs, self.device = graphs, device

    def eval(self) -> _OrtTextEncoder:
        return self

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        """[1, l] int64 x2 -> .last_hidden_state [1, l, dim] fp32."""
        emb = self.graphs.text_encoder(input_ids.cpu().long().numpy(), attention_mask.cpu().long().numpy())
        return SimpleNamespace(last_hidden_state=torch.from_numpy(emb).to(self.device))


class _Projected(nn.Module):
    """Identity in the projection's place: the graph's output is already projected. Carries the width and device
    that `TextConditioner` reads from its projection."""

    def __init__(self, dim: int, device: torch.device) -> None:
        super().__init__()
        self.out_features = dim
        self.register_buffer("weight", torch.empty(0, device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def picked(logits: tuple[torch.Tensor, torch.Tensor], frames: torch.Tensor | None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """lm_step computes every frame: (cond, uncond) [B, T, V] -> at `frames` [B, n] (the `Step` contract)."""
    cond, uncond = logits
    cond_s = pick_frames(cond, frames)
    return cond_s, cond_s if uncond is cond else pick_frames(uncond, frames)


class OrtStep:
    """Text embeddings [B, L, dim] -> step(codes [B, K, T], stage, guided) -> (cond, uncond) logits [B, T, V] each,
    like `engine.api.TorchStep`: `cross_kv` runs once per request, each step is one `lm_step` run on [codes; codes]
    (on codes alone when unguided: the graph's rows past the text's B are the unconditional ones, here none).

    CPU: numpy in/out without copies. CUDA: IO binding; the cross k/v stay on the GPU between steps, the codes are
    bound from the torch tensor and the logits written into a torch tensor, on torch's current stream."""

    def __init__(self, graphs: Graphs, device: torch.device) -> None:
        self.graphs, self.device = graphs, device
        self.cross_kv, self.lm_step = graphs.sessions["cross_kv"], graphs.sessions["lm_step"]
        self.kv_names = graphs.kv_names
        kv_type = {i.name: i.type for i in self.lm_step.get_inputs()}[self.kv_names[0]]
        self.kv_dtype = _NP_DTYPES[kv_type]
        self.vocab = int(self.lm_step.get_outputs()[0].shape[-1])
        self.limits = graphs.limits

    def __call__(self, cond: torch.Tensor) -> Step:
        check_text_embeds(cond, self.limits)
        if self.device.type == "cuda":
            return self._cuda_step(cond)
        kv = self.graphs.cross_kv(cond.detach().cpu().float().numpy())
        batch = cond.shape[0]

        def step(codes: torch.Tensor, stage: int, guided: bool, frames: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
            check_step_inputs(codes, stage, batch, self.limits)
            logits = self.graphs.lm_step(step_rows(codes, guided).numpy(), stage, kv, guided)  # [2B or B, T, V]
            return picked(split_rows(torch.from_numpy(logits), guided), frames)

        return step

    def _cuda_step(self, cond: torch.Tensor) -> Step:
        """IO-bound variant (written for onnxruntime-gpu; not exercised by the CPU test-suite)."""
        import onnxruntime as ort

        dev_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        cond = cond.detach().to(self.device, torch.float32).contiguous()
        kv_bind = self.cross_kv.io_binding()
        kv_bind.bind_input("text_embeds", "cuda", dev_id, np.float32, tuple(cond.shape), cond.data_ptr())
        for name in self.kv_names:
            kv_bind.bind_output(name, "cuda", dev_id)  # onnxruntime allocates; the values stay on the GPU
        kv_bind.synchronize_inputs()
        self.cross_kv.run_with_iobinding(kv_bind)
        kv_values = kv_bind.get_outputs()  # OrtValues, kept alive by the closure below
        bind = self.lm_step.io_binding()
        for name, value in zip(self.kv_names, kv_values):
            bind.bind_ortvalue_input(name, value)

        batch = cond.shape[0]

        def step(codes: torch.Tensor, stage: int, guided: bool, frames: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
            check_step_inputs(codes, stage, batch, self.limits)
            both = step_rows(codes, guided).contiguous()  # [2B or B, K, T] int64 on the GPU
            logits = torch.empty(both.shape[0], both.shape[-1], self.vocab, device=self.device)
            bind.bind_input("codes", "cuda", dev_id, np.int64, tuple(both.shape), both.data_ptr())
            stage_value = ort.OrtValue.ortvalue_from_numpy(np.array(stage, dtype=np.int64))  # host scalar
            bind.bind_ortvalue_input("stage", stage_value)  # onnxruntime copies it to where the graph needs it
            bind.bind_output("logits", "cuda", dev_id, np.float32, tuple(logits.shape), logits.data_ptr())
            bind.synchronize_inputs()
            self.lm_step.run_with_iobinding(bind)
            bind.synchronize_outputs()
            return picked(split_rows(logits, guided), frames)

        return step


def _providers(device: torch.device, providers: Sequence[Any] | None) -> list[Any]:
    import onnxruntime as ort

    if providers is not None:
        return list(providers)
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type != "cuda":
        raise ValueError(f"the onnx backend runs on cpu or cuda, not {device.type}; use --device cpu or cuda")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ValueError("--device cuda needs onnxruntime's CUDA execution provider: `pip install onnxruntime-gpu` "
                         f"(this onnxruntime has {ort.get_available_providers()}), or use --device cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    index = device.index if device.index is not None else torch.cuda.current_device()
    # one stream for torch and onnxruntime, so the loop's torch ops and the graph runs are ordered without syncs
    stream = torch.cuda.current_stream(index).cuda_stream
    return [("CUDAExecutionProvider", {"device_id": index, "user_compute_stream": str(stream)}),
            "CPUExecutionProvider"]


def _check_io(name: str, session: Any, spec: dict[str, Any], export_dir: Path, manifest: dict[str, Any]) -> None:
    """The graph's inputs and outputs must be those the manifest recorded at export: names, types and ranks."""
    for kind, values in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        got = [(v.name, v.type, len(v.shape)) for v in values]
        want = [(v["name"], v["type"], len(v["shape"])) for v in spec[kind]]
        if got != want:
            raise ValueError(f"{export_dir / spec['file']}: graph {kind} {got} do not match the manifest's {want}; "
                             "the export dir mixes files from different exports. "
                             f"{reexport_hint(export_dir, manifest)}")


def load_engine(export_dir: str | Path, device: str | torch.device = "cpu", providers: Sequence[Any] | None = None,
                *, session_options: Any = None, verify: bool = True, cache_size: int = CACHE_SIZE) -> Engine:
    """An Engine over the graphs in `export_dir` (written by `magnet export`).

    device: "cpu" (CPU execution provider) or "cuda[:i]" (CUDA EP with IO binding; needs onnxruntime-gpu).
    providers: onnxruntime providers to use instead of the device's default. session_options: an
    `onnxruntime.SessionOptions` for every graph (threads, graph optimisation level; default: onnxruntime's, without
    spin-waiting). verify: check the files' sha256 against the manifest (reads every byte once). Raises ValueError,
    saying how to fix it, when the export dir is incomplete, from another format version, corrupted, or its graphs
    do not match the manifest. The engine decodes with the source model's defaults (the manifest's "generation").
    """
    import onnxruntime as ort
    from transformers import AutoTokenizer

    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir, verify=verify)
    if session_options is None:
        session_options = ort.SessionOptions()
        # each step alternates an onnxruntime call with torch's sampling: threads left spinning after the call
        # would take the cores the sampling needs (10 s from the default model: 1.5 s spinning, 0.9 s not)
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    dev = torch.device(device)
    chosen = _providers(dev, providers)
    sessions: dict[str, Any] = {}
    for name in GRAPHS:
        spec = manifest["graphs"][name]
        path = export_dir / spec["file"]
        try:
            sessions[name] = ort.InferenceSession(str(path), session_options, providers=chosen)
        except _ort_errors() as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"onnxruntime cannot load {path} ({msg[:300]}); the file may be corrupted. "
                             f"{reexport_hint(export_dir, manifest)}") from e
        _check_io(name, sessions[name], spec, export_dir, manifest)
    kv_names = manifest.get("cross_kv_names", [])
    step_inputs = [i.name for i in sessions["lm_step"].get_inputs()]
    if step_inputs != ["codes", "stage", *kv_names] or [o.name for o in sessions["cross_kv"].get_outputs()] != kv_names:
        raise ValueError(f"lm_step inputs {step_inputs} and cross_kv outputs do not line up with {kv_names}; "
                         f"{reexport_hint(export_dir, manifest)}")
    try:
        cfg = ModelConfig.from_dict(manifest["model_config"])
        info = CodecInfo(**manifest["codec"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{export_dir}: the manifest's model or codec settings are invalid ({e}); "
                         f"{reexport_hint(export_dir, manifest)}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(export_dir / manifest["tokenizer"]))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the tokenizer saved in {export_dir / manifest['tokenizer']} ({e}); "
                         f"{reexport_hint(export_dir, manifest)}") from e
    graphs = Graphs(sessions, manifest)
    text = TextConditioner(tokenizer, _OrtTextEncoder(graphs, dev), _Projected(cfg.dim, dev), cache_size=cache_size)
    codec = OrtCodec(graphs, sessions["codec_encode"], info, dev)
    step = OrtStep(graphs, dev)
    try:  # exports before the manifest carried "generation" decode with the reference defaults, as they did
        defaults = GenerationConfig.from_dict(manifest.get("generation", {}), default_generation(cfg))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{export_dir}: the manifest's generation settings are invalid ({e}); "
                         f"{reexport_hint(export_dir, manifest)}") from e
    eng = Engine(cfg, text, codec, dev, make_step=step, defaults=defaults)
    eng.backend = "onnx"
    return eng


class OrtBackend:
    """`magnet_engine.load(EXPORT_DIR)` / `--model EXPORT_DIR`: an export folder (its manifest.json names the format)
    runs
    on onnxruntime. Registered under the entry-point group magnet_engine.backends as "onnx"."""

    name = "onnx"

    def handles(self, source: Path) -> bool:
        return is_export(source)

    def load(self, source: str | Path | None, *, device: str | None, dtype: str | None,
             text_encoder: str | Path | None) -> Engine:
        if source is None or not is_export(Path(source)):
            raise SettingError(f"the onnx <backend> reads an export folder made by `magnet export`; <model> "
                               f"{source or 'default'} is not one (export it first: magnet export --model "
                               f"{source or 'default'} --out DIR)")
        if dtype is not None:
            raise SettingError("the onnx <backend> runs the dtype the export was made in: drop <dtype> (or export "
                               "again with magnet export --dtype)")
        if text_encoder is not None:
            raise SettingError("the onnx <backend> runs the text encoder inside the export folder: drop "
                               "<text_encoder>")
        return load_engine(source, device=parse_device(device or "cpu"))

    def adapt(self, engine: Engine) -> Engine:
        raise SettingError("the onnx <backend> runs exported graphs, not a built torch model: export it with "
                           "`magnet export --model MODEL --out DIR`, then load DIR")
