"""The Python API: `Engine`, whose `generate(prompts, ...)` goes text -> tokens -> audio, and the torch backend that
builds one (`load_torch`; its step and packed/captured LM passes). `magnet_engine.load(...)` picks a backend and
loads (engine.backends.load): it sits above this module, so that the backends' registry reaches `load_torch`
without an import circle."""
from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import hybrid, longform, magnet, musicgen
from .config import (  # noqa: F401 - DETERMINISTIC_BY_DEFAULT re-exported
    DETERMINISTIC_BY_DEFAULT,
    GenerationConfig,
    ModelConfig,
    SettingError,
    SettingTypeError,
    default_generation,
)
from .graph import Captured, ProgramCache
from .loading import (
    DEFAULT_MODEL,
    float_state,
    is_own_format,
    parse_xp_cfg,
    read_own_format,
    read_package,
    resolve_files,
    resolve_named,
    shapes_only,
)
from .model import LM
from .musicgen import ARCompanion
from .passes import (  # noqa: F401 - re-exported: the torch backend's step and passes
    GraphedPass,
    PackedPass,
    TorchRequestStep,
    TorchStep,
    pass_layout,
    static_step,
    text_kv,
)
from .request import Request, build_request, settings
from .rescore import build_rescorer
from .results import Chunk, Generation, join
from .sampling import sample_ref
from .text import TextConditioner, load_text_encoder

TEXT_PROJ_KEY = "condition_provider.conditioners.description.output_proj."


@dataclass
class _Run:
    prompt: torch.Tensor | None  # [B, K, P] the request's prompt codes (window 0 only)
    generators: list[torch.Generator] | None  # one per row, running on through every window
    cond: torch.Tensor  # [B, L, dim] text conditioning, shared by every window
    step: magnet.Step | None  # MAGNeT's step function on `cond` (None for the AR baseline)


def _finish(steps: Generator[None, None, Any]) -> Any:
    """Run a stepping generator (`Engine._segment`) to its end -> what it returns."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


def _length(prompt: torch.Tensor | None) -> int:
    return 0 if prompt is None else prompt.shape[-1]


def _offset(progress: magnet.Progress, before: int, total: int) -> magnet.Progress:
    """A window's progress(done, its total) -> the piece's progress(before + done, total)."""
    def report(done: int, _: int) -> None:
        progress(before + done, total)

    return report


class Engine:
    """A loaded model on one device: text conditioner, a step factory, a sampler and a codec around one decoding
    loop. Backends swap parts from outside: `kernels.backend.apply` replaces `sample` and the LM's attention op, the
    onnxruntime backend replaces `text`, `make_step` and `codec`; `generate` is the same for all."""

    def __init__(self, config: ModelConfig, text: Callable[[Sequence[str | None]], torch.Tensor],
                 codec: Any, device: torch.device, lm: LM | None = None,
                 make_step: Callable[[torch.Tensor], magnet.Step] | None = None,
                 defaults: GenerationConfig | None = None) -> None:
        self.config, self.text, self.codec, self.device, self.lm = config, text, codec, device, lm
        self.defaults = defaults if defaults is not None else default_generation(config)
        self.sample: magnet.Sampler = sample_ref
        self.backend = "torch"  # the name of the backend that built or adapted it (engine.backends)
        # whole programs captured as CUDA graphs, one per request shape (engine.graph; `set_graph`)
        self.graph = False
        self.programs = ProgramCache()
        if make_step is None:
            assert lm is not None, "an Engine needs an LM or a step factory"
            make_step = TorchStep(lm)
        self.make_step = make_step
        # several requests' steps in one LM pass (the scheduler); a backend without one runs each alone
        self.lm_pass: magnet.Pass = PackedPass(lm) if lm is not None else magnet.each_alone

    @property
    def deterministic(self) -> bool:
        """Whether tokens are independent of batchmates, arrival order and thread count (`set_deterministic`)."""
        return self.lm is None or self.lm.deterministic  # onnxruntime: every request runs alone (magnet.each_alone)

    def set_deterministic(self, on: bool) -> Engine:
        """Row-invariant linears (`LM.invariant_linear`: engine.model.invariant_rows on CPU, or the Triton backend's
        fixed-tile GEMM on CUDA): a request's tokens are its solo run's whatever shares its LM pass (the
        scheduler's batchmates, their number and order), on any thread count. `load` turns it on
        where it is cheap (DETERMINISTIC_BY_DEFAULT: on CPU). Tokens of a request alone are the same either way only
        up to rounding: compare runs made in the same mode."""
        if not isinstance(on, bool):
            raise SettingTypeError(f"<deterministic> must be true or false, got {type(on).__name__}")
        if self.lm is not None:
            self.lm.set_deterministic(on)
        return self

    def set_graph(self, on: bool) -> Engine:
        """Capture each request shape's whole decoding program once as a CUDA graph and replay it per request (MAGNeT:
        every stage and step; MusicGen: the whole frame loop; `decode_together`: a cohort's), and the scheduler's LM
        pass once per layout (`GraphedPass`). Needs the torch LM on a CUDA device. Requests with a rescorer, and the
        hybrid's AR prefix, run step by step as before."""
        if not isinstance(on, bool):
            raise SettingTypeError(f"<graph> must be true or false, got {type(on).__name__}")
        if on and (self.lm is None or self.device.type != "cuda"):
            raise SettingError(f"<graph> captures CUDA graphs: it needs the torch or triton backend on a CUDA device, "
                               f"not the {self.backend} backend on {self.device}; drop it")
        self.graph = on
        if self.lm is not None:
            self.lm_pass = GraphedPass(self.lm, self.device) if on else PackedPass(self.lm)
        return self

    def capture_failures(self) -> list[str]:
        """Why each program or pass layout that failed to capture did (they run eagerly): empty when all went well.
        A benchmark of captured graphs fails when this is not empty (bench load, bench e2e, gpu.sh)."""
        caches = [self.programs] + ([self.lm_pass.graphs] if isinstance(self.lm_pass, GraphedPass) else [])
        return [f"{key}: {reason}" for cache in caches for key, reason in cache.failures.items()]

    @property
    def sample_rate(self) -> int:
        return int(self.codec.config.sample_rate)

    def default_generation(self) -> GenerationConfig:
        """The model's own defaults: the reference API's for released models, config.json's for ours."""
        return self.defaults

    def settings(self, config: GenerationConfig | None = None, **overrides: Any) -> GenerationConfig:
        """The model's defaults, then `config`, then keyword overrides (GenerationConfig field names), checked
        against this model: the settings part of `request` (one validator: `engine.request.settings`), for callers
        that need a GenerationConfig without prompts (the seed stays as given)."""
        return settings(self.config, self.defaults, config, overrides)

    def request(self, prompts: str | Sequence[str | None], config: GenerationConfig | None = None, *,
                prompt_codes: torch.Tensor | None = None, prompt_audio: torch.Tensor | None = None,
                rescorer: Engine | ARCompanion | None = None, ar_model: Engine | ARCompanion | None = None,
                **fields: Any) -> Request:
        """A request checked against this model (engine.request): prompts (B texts, None = unconditional), the
        model's defaults then `config` then `fields` (GenerationConfig names), prompt_codes [B, K, P] int64 or
        prompt_audio [B, 1, samples] at the codec's rate to continue, and the quality levers' MusicGen models:
        `rescorer` rescores every step's tokens (engine.rescore), `ar_model` writes the first `hybrid_prefix`
        seconds (engine.hybrid). Raises SettingError (a ValueError) naming the argument."""
        return build_request(self.config, self.defaults, sample_rate=self.sample_rate, device=self.device,
                             prompts=prompts, config=config, prompt_codes=prompt_codes, prompt_audio=prompt_audio,
                             rescorer=rescorer, ar_model=ar_model, **fields)

    def companion(self) -> ARCompanion:
        """This engine as the AR model of a quality lever (rescorer / hybrid): needs a MusicGen torch LM."""
        if self.config.kind != "musicgen":
            raise SettingError(f"a rescorer or hybrid AR model must be an autoregressive (MusicGen) model, got a "
                               f"{self.config.kind!r} model; pass a MusicGen checkpoint")
        if self.lm is None:
            raise SettingError("a rescorer or hybrid AR model needs the torch LM (its causal, KV-cached path); load "
                               "it with the torch backend")
        return ARCompanion(self.config, self.lm, self.text, self.defaults, self.sample, self.device,
                           self.sample_rate)

    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str | None] | Request, config: GenerationConfig | None = None, *,
                 progress: magnet.Progress | None = None, decode: bool = True, **request: Any) -> Generation:
        """Text -> tokens -> audio. `prompts` is a `Request` built by `self.request(...)`, or the arguments of
        `request` (prompts, config, prompt_codes, prompt_audio, rescorer, ar_model, GenerationConfig fields as
        keywords), from which one is built here. `progress(done, total)` is called after each decoding step (over
        all windows of a long-form piece). A duration past the segment is generated window by window
        (engine.longform); its audio is the concatenation of `generate_stream`'s chunks, sample for sample."""
        req = self._as_request(prompts, config, request)
        if longform.is_long(self.config, req.gen):
            return join(list(self._chunks(req, progress, decode)), self.sample_rate, req.gen.seed)
        run = self._start(req)
        codes, stats = _finish(self._segment(req, run, req.gen, run.prompt, progress, first=True))
        audio = self.decode(codes) if decode else torch.empty(req.batch, 1, 0)
        return Generation(audio=audio, codes=codes, sample_rate=self.sample_rate, seed=req.gen.seed, stats=stats)

    @torch.no_grad()
    def generate_stream(self, prompts: str | Sequence[str | None] | Request, config: GenerationConfig | None = None,
                        *, progress: magnet.Progress | None = None, **request: Any) -> Iterator[Chunk]:
        """`generate`, yielding audio as windows complete: one `Chunk` per window (one in all when the duration
        fits in a segment). The chunks' audio, concatenated, is `generate(...)`'s audio for the same request and
        seed; a chunk holds the samples no later token can change (engine.longform.StreamDecoder), so the last
        few frames of a window come with the next one."""
        req = self._as_request(prompts, config, request)
        yield from (item for item in self.stream_steps(req, progress) if item is not None)

    @torch.no_grad()
    def stream_steps(self, req: Request, progress: magnet.Progress | None = None) -> Iterator[Chunk | None]:
        """`generate_stream` one decoding step at a time: None after each MAGNeT step, a `Chunk` when a window
        completes. A caller that interleaves other work between steps (the scheduler, beside its batch) advances a
        long piece without holding its loop for a whole window."""
        if longform.is_long(self.config, req.gen):
            yield from self._windows(req, progress, decode=True)
            return
        run = self._start(req)
        codes, stats = yield from self._segment(req, run, req.gen, run.prompt, progress, first=True)
        yield Chunk(self.decode(codes), codes, 0, 1, stats)

    def _as_request(self, prompts: str | Sequence[str | None] | Request, config: GenerationConfig | None,
                    request: dict[str, Any]) -> Request:
        if not isinstance(prompts, Request):
            return self.request(prompts, config, **request)
        if config is not None or request:
            raise SettingError("a Request already holds its settings: pass it alone, or pass prompts and "
                               "settings instead of a Request")
        if prompts.model != self.config:
            raise SettingError("this Request was built for another model: build it with this engine's request(...)")
        return prompts

    def start(self, req: Request) -> magnet.Decoding:
        """A MAGNeT request's decoding program (`magnet.Decoding`) with its step (its text's k/v), its prompt and
        noise generators, as `generate` builds it: what the scheduler and `decode_together` advance step by step.
        Long pieces (window by window: `stream_steps`) and the hybrid's AR prefix go through `generate`."""
        return self.start_many([req])[0]

    def start_many(self, reqs: Sequence[Request]) -> list[magnet.Decoding]:
        """`start` of several requests at once (those the scheduler starts in one iteration), each program the one
        `start` builds for it, bit for bit: their texts are conditioned together where the step factory can
        (`TorchStep.many`: one batched product per folded text length). A request that cannot start raises here,
        and none starts."""
        if self.config.kind != "magnet":
            raise SettingError(f"Engine.start builds MAGNeT decoding programs; this is a {self.config.kind} model: "
                               "use generate")
        for req in reqs:
            if req.ar_model is not None or longform.is_long(self.config, req.gen):
                raise SettingError("a long piece or a hybrid request runs in several parts: use generate or "
                                   "generate_stream")
        decs = []
        for req, run in zip(reqs, self._start_many(reqs)):
            rescore = None if req.rescorer is None else build_rescorer(self.config, req.rescorer, list(req.prompts),
                                                                       req.gen)
            decs.append(magnet.Decoding(self.config, req.gen, req.batch, self.device, run.prompt, run.generators,
                                        rescore, run.step))
        return decs

    def _start(self, req: Request) -> _Run:
        """What every window of a request shares: its encoded prompt, noise generators and text conditioning."""
        return self._start_many([req])[0]

    def _start_many(self, reqs: Sequence[Request]) -> list[_Run]:
        prompts, generators, conds = [], [], []
        for req in reqs:
            prompt = None
            if req.prompt_codes is not None:
                prompt = req.prompt_codes.to(self.device)
            elif req.prompt_audio is not None:
                prompt = self.encode(req.prompt_audio)
            prompts.append(prompt)
            generators.append(magnet.row_generators(req.gen.seed, req.batch, self.device))  # row b: seed + b
            conds.append(self.text(list(req.prompts)))
        steps = [None] * len(reqs) if self.config.kind == "musicgen" else self._make_steps(conds)
        return [_Run(*run) for run in zip(prompts, generators, conds, steps)]

    def _make_steps(self, conds: Sequence[torch.Tensor]) -> list[magnet.Step]:
        """Text embeddings [B, L, dim] per request -> their steps: together where the step factory has a `many`
        (TorchStep's), else one request at a time (e.g. the onnxruntime backend's factory)."""
        many = getattr(self.make_step, "many", None)
        return many(conds) if many is not None else [self.make_step(cond) for cond in conds]

    def _segment(self, req: Request, run: _Run, gen: GenerationConfig, prompt: torch.Tensor | None,
                 progress: magnet.Progress | None, first: bool
                 ) -> Generator[None, None, tuple[torch.Tensor, dict[str, float]]]:
        """One segment's tokens [B, K, T'] under `gen`, continuing `prompt` [B, K, P]: the plain run, or a window
        of a long piece (`first`: the window that the hybrid's AR prefix writes into). A generator that yields after
        each MAGNeT step and returns (codes, lever costs): `_finish` runs it whole."""
        prompts = list(req.prompts)
        generator = None if run.generators is None else run.generators[0]  # the AR paths' one stream (as before)
        stats: dict[str, float] = {}
        if self.config.kind == "musicgen":
            if self.lm is None:
                raise SettingError("MusicGen generation needs the torch LM (its KV-cached AR loop); this backend "
                                   "has only a step function: load the model with the torch backend")
            codes = musicgen.generate_tokens_ar(self.lm, run.cond, gen, len(prompts), self.device, prompt, generator,
                                                progress, sample=self.sample,
                                                mode="program" if self.graph else "eager", programs=self.programs)
            return codes, stats
        rescore = None if req.rescorer is None else build_rescorer(self.config, req.rescorer, prompts, gen)
        prefix_timer = None
        if req.ar_model is not None and first:  # hybrid: the AR prefix becomes MAGNeT's audio prompt
            n_prefix = hybrid.prefix_frames(self.config, gen)
            n_ar = hybrid.ar_steps(req.ar_model, n_prefix, 0 if prompt is None else prompt.shape[-1])
            ar_progress, progress = hybrid.split_progress(progress, n_ar, sum(gen.steps))
            prompt, prefix_timer = hybrid.generate_prefix(self.config, req.ar_model, prompts, gen, prompt,
                                                          generator, ar_progress)
        if self.graph and rescore is None:
            codes = self._replay(run, gen, len(prompts), prompt, progress)
        else:
            dec = magnet.Decoding(self.config, gen, len(prompts), self.device, prompt, run.generators, rescore,
                                  run.step)
            yield from magnet.stepping(dec, self.sample, progress)
            codes = dec.codes
        if rescore is not None:
            stats.update(rescore.stats())
        if prefix_timer is not None:
            stats.update(hybrid_prefix_frames=float(n_prefix), hybrid_prefix_s=prefix_timer.seconds()[0])
        return codes, stats

    def _replay(self, run: _Run, gen: GenerationConfig, batch: int, prompt: torch.Tensor | None,
                progress: magnet.Progress | None) -> torch.Tensor:
        """A segment through its shape's captured program (built on first use: `self.programs`)."""
        dec = magnet.Decoding(self.config, gen, batch, self.device, prompt, run.generators, step=run.step)
        (codes,) = self._run_captured([dec], magnet.each_alone)
        if progress is not None:
            progress(dec.total, dec.total)
        return codes

    @torch.no_grad()
    def decode_together(self, decs: Sequence[magnet.Decoding]) -> list[torch.Tensor]:
        """Requests that start together (each its own `Decoding`, as `Engine.start` builds it) decoded to
        their end, one LM pass per step (`lm_pass`) -> each one's codes [B, K, T]; static batching. With `graph`
        on, the cohort's whole program is one CUDA graph per cohort shape (its requests' shapes and text lengths),
        captured the first time. A request's tokens are what the scheduler gives it in the same company."""
        if not self.graph:
            magnet.run_together(self.lm_pass, self.sample, decs)
            return [d.codes for d in decs]
        assert self.lm is not None  # set_graph checked it
        return self._run_captured(decs, PackedPass(self.lm))

    def _run_captured(self, decs: Sequence[magnet.Decoding], lm_pass: magnet.Pass) -> list[torch.Tensor]:
        """`run_together` over `decs` through the program captured for their shapes (`self.programs`): the first
        requests of a shape become the program's static buffers, later ones are copied into them. -> copies of
        the codes (the program's buffers serve the next request)."""
        key = tuple((d.shape_key(), pass_layout(d)) for d in decs)
        values = [t for d in decs for t in d.inputs() + text_kv(d.step)]

        def build() -> Captured[list[torch.Tensor]]:
            inputs = []
            for d in decs:
                d.step = static_step(self.lm, d.step)
                inputs += d.inputs() + text_kv(d.step)

            def program() -> list[torch.Tensor]:
                magnet.run_together(lm_pass, self.sample, decs)
                return [d.codes for d in decs]

            return Captured(program, inputs, self.device)

        def eager() -> list[torch.Tensor]:  # the same program, uncaptured (its capture failed)
            magnet.run_together(lm_pass, self.sample, decs)
            return [d.codes for d in decs]

        return [codes.clone() for codes in self.programs.run(key, build, values, eager)]

    def _chunks(self, req: Request, progress: magnet.Progress | None, decode: bool) -> Iterator[Chunk]:
        return (item for item in self._windows(req, progress, decode) if item is not None)

    def _windows(self, req: Request, progress: magnet.Progress | None, decode: bool) -> Iterator[Chunk | None]:
        """A long piece window by window (engine.longform.plan): each window continues from the last `context`
        frames of the piece; its new tokens go through one StreamDecoder, so the audio has no seam. Yields None
        after each decoding step and a Chunk per window."""
        windows = longform.plan(self.config, req.gen)
        run = self._start(req)
        steps = [self._steps(req, w.gen, w.context if w.index else _length(run.prompt), w.index == 0)
                 for w in windows]
        stream = longform.StreamDecoder(self.codec) if decode else None
        tail: torch.Tensor | None = None  # [B, K, >= C] the piece's last frames: the window's codes up to its end
        for w in windows:
            report = None if progress is None else _offset(progress, sum(steps[:w.index]), sum(steps))
            prompt = run.prompt if tail is None else tail[..., tail.shape[-1] - w.context:]
            codes, stats = yield from self._segment(req, run, w.gen, prompt, report, first=w.index == 0)
            new = codes[..., w.context:w.context + (codes.shape[-1] if w.index == 0 else w.keep)]  # [B, K, new]
            tail = codes[..., :w.context + new.shape[-1]]  # context + new: at least C frames, no growing copy
            last = w.index == len(windows) - 1
            audio = stream.push(new, last).float() if stream is not None else torch.empty(req.batch, 1, 0)
            yield Chunk(audio, new, w.index, len(windows), stats)

    def _steps(self, req: Request, gen: GenerationConfig, prompt: int, first: bool) -> int:
        """Progress steps of one segment after a `prompt`-frame prompt, as its loop counts them: MAGNeT's steps
        (plus the hybrid's AR prefix in the first window), the AR loop's columns."""
        if self.config.kind == "musicgen":
            pattern = musicgen.DelayPattern(self.config.delays, gen.frames(self.config))
            return pattern.steps - pattern.first_step(prompt)
        n = sum(gen.steps)
        if req.ar_model is not None and first:
            n += hybrid.ar_steps(req.ar_model, hybrid.prefix_frames(self.config, gen), prompt)
        return n

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T] -> audio [B, 1, T·hop] fp32."""
        return self._decode_with(self.codec.decode, codes)

    def _decode_with(self, call: Callable[[torch.Tensor], torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
        return call(codes.to(self.device)).float()

    @torch.no_grad()
    def decode_many(self, codes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Several requests' codes [B, K, T] each -> their audio, as `decode` gives each. Codes of equal shape go
        through one codec call. A plain engine takes the codec's batched call, as a static batch does (its kernels
        round a sample by ~1e-7 differently with the batch: within a plain engine's promise). A deterministic one
        batches one-row requests with `decode_rows`, which gives each row bit for bit its own decode, so a request's
        audio is its solo run's; a request of several rows, or a codec without `decode_rows`, decodes alone."""
        together = getattr(self.codec, "decode_rows", None) if self.deterministic else self.codec.decode
        out: list[torch.Tensor | None] = [None] * len(codes)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, c in enumerate(codes):
            if together is None or (self.deterministic and c.shape[0] != 1):
                out[i] = self.decode(c)
            else:
                groups.setdefault(tuple(c.shape[1:]), []).append(i)
        for idx in groups.values():
            if len(idx) == 1:
                out[idx[0]] = self.decode(codes[idx[0]])
                continue
            audio = self._decode_with(together, torch.cat([codes[i] for i in idx]))  # [ΣB, 1, samples]
            for i, a in zip(idx, audio.split([codes[i].shape[0] for i in idx])):
                out[i] = a
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [B, 1, samples] at the codec's rate -> codes [B, K, T]."""
        return self.codec.encode(audio.to(self.device, torch.float32))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(device: str | torch.device | None) -> torch.device:
    """"cpu", "cuda" or "cuda:N" (None: cuda when available) -> torch.device, or a SettingError saying what to use."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise SettingError(f"unknown <device> {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise SettingError(f"<device> {device!r} is not supported: use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SettingError(f"<device> {device} asked for, but torch sees no CUDA GPU; use cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise SettingError(f"<device> {device}: torch sees {torch.cuda.device_count()} GPU(s), numbered from 0")
    return dev


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:  # the reference runs its transformer layers in fp16 on CUDA, fp32 on CPU
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise SettingError(f"unknown <dtype> {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_torch(model: str | Path | None = None, text_encoder: str | Path | None = None,
               device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> Engine:
    """The torch backend's loader (see `load`)."""
    from .codec import CodecConfig, Encodec, load_codec

    dev = parse_device(device)
    dt = parse_dtype(dtype, dev)
    if model is None and not is_own_format(DEFAULT_MODEL):
        raise ValueError(f"no model given and the default model is missing from {DEFAULT_MODEL}: pass --model "
                         "DIR|ID (e.g. facebook/magnet-small-10secs) or reinstall the package")
    model = resolve_named(model)
    if is_own_format(Path(model)):
        config, lm_state, codec_state = read_own_format(Path(model))
        cfg = ModelConfig.from_dict(config["model"])
        with shapes_only():  # no memory, no initialisation: the weights are the file's (`_load_strict` assigns them)
            codec = Encodec(CodecConfig.from_dict(config["codec"]))
            lm = LM(cfg)
        _load_strict(codec, codec_state, Path(model) / "codec.safetensors", "codec")
        text_source: str | Path = cfg.text_encoder
        defaults = GenerationConfig.from_dict(config.get("generation", {}), default_generation(cfg))
        _load_strict(lm, float_state(lm_state), Path(model) / "lm.safetensors", cfg.kind)
    else:
        lm_path, codec_path = resolve_files(model)
        pkg = read_package(lm_path, "LM checkpoint")
        state = pkg["best_state"]
        cfg = ModelConfig.from_xp_cfg(parse_xp_cfg(pkg, lm_path), state)
        with shapes_only():
            lm = LM(cfg)
        state = float_state({(("text_proj." + k[len(TEXT_PROJ_KEY):]) if k.startswith(TEXT_PROJ_KEY) else k): v
                             for k, v in state.items()})
        _load_strict(lm, state, lm_path, cfg.kind)
        codec = load_codec(codec_path)
        beside = lm_path.parent / "t5"
        text_source = beside if beside.is_dir() else cfg.text_encoder
        defaults = default_generation(cfg)
    lm = lm.to(dev).to_dtype(dt).eval()
    codec = codec.to(dev).eval()
    tokenizer, encoder = load_text_encoder(text_encoder if text_encoder is not None else text_source, dev)
    return Engine(cfg, TextConditioner(tokenizer, encoder, lm.text_proj), codec, dev, lm=lm, defaults=defaults)


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Every parameter and buffer of `module` (built on the meta device: no initialisation) becomes its tensor in
    `state` (assigned, not copied); a missing or unexpected name is a ValueError."""
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit a {what} model of its own config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
