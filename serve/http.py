"""The HTTP API without Ray: `build_app`, the FastAPI app over a `Front`, and `Service` (an Engine behind the request
scheduler), the front that serves in this process. serve.deployment runs the app in the ingress deployment over
serve.ingress.Ingress (which calls the model replicas' `Service` through a handle, and retries on a replica's death).

    POST /v1/generate  JSON {prompt, GenerationConfig fields, format, timeout, stream} -> audio (or JSON with
                       Accept); "stream": true sends a WAV with chunked transfer, a window at a time
    GET  /v1/health    200 while the scheduler's loop runs
    GET  /v1/model     the model's config and generation defaults, the service's limits
    GET  /openapi.json the request schema, built from GenerationConfig
    GET  /             a page with a form that calls /v1/generate (serve/page.html)

The body is parsed by a pydantic model generated from the engine's rules for the served model (`RequestSchema`:
engine.request.request_rules, GenerationConfig's fields tightened by the request checks), so the OpenAPI document
states exactly what the server takes; a refusal carries the engine's message for the key at fault, spelled with JSON
keys. The scheduler then checks the request as a whole (`Scheduler.submit`, engine.request).

The generate route is two steps: `RequestSchema.parse` (body -> Job), `Service.generate` (Job -> Response: the scheduler
decodes, and its loop thread renders the audio with `Service.render`, so normalisation and encoding never run on
the event loop, nor torch on a second thread); a streamed one uses `Service.stream` (Scheduler.stream's chunks as
they complete, turned into PCM by the loop thread, behind the same envelope and errors).

Errors: an `HTTPError` is answered as JSON {"error", "field"} by an exception handler; anything else is a 500
whose body carries only a request id and a generic message, the traceback going to the log under that id. The
API key is checked by an HTTPBearer dependency, declared (a security scheme, 401 answers) only when a key is
configured. Every operation documents the statuses, headers and JSON bodies it answers (`responses`).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import json
import logging
import secrets
import time
import typing
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from magnet_engine.engine.config import MAX_DURATION, MAX_SEED, GenerationConfig, Rule, SettingError, whole
from magnet_engine.engine.request import check_prompts
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, create_model
from starlette.responses import JSONResponse, Response

from .config import HTTP_NAMES, ServiceConfig, scheduler_limits

if TYPE_CHECKING:
    from magnet_engine.engine.api import Engine, Generation
    from magnet_engine.engine.config import ModelConfig

MEDIA_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg"}
log = logging.getLogger("ray.serve")


class Metrics(Protocol):
    """Where a replica reports (serve.deployment: Ray's Prometheus metrics)."""

    def request(self, status: int, latency_s: float) -> None: ...


class HTTPError(Exception):
    """An error answered as JSON {"error": message, "field": key}."""

    def __init__(self, status: int, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers or {}

    def response(self) -> JSONResponse:
        body = {"error": self.message} | ({"field": self.field} if self.field else {})
        return JSONResponse(body, status_code=self.status, headers=self.headers)

    @classmethod
    def timed_out(cls, reason: str) -> HTTPError:
        """A request past its deadline: 504, naming the "timeout" key."""
        return cls(504, f"{reason}; send a larger \"timeout\" (seconds) or a shorter request", "timeout")

    @classmethod
    def setting(cls, e: SettingError) -> HTTPError:
        """A bad setting: 422 with the message in JSON keys (the engine's template, spelled for HTTP)."""
        field = None if e.field is None else HTTP_NAMES.get(e.field, e.field)
        return cls(422, e.spelled(HTTP_NAMES), field)


@dataclass(frozen=True)
class Job:
    """What a generate request asks for, its generation settings still unchecked (Scheduler.submit checks them)."""

    prompt: str | None
    fields: dict[str, Any]  # GenerationConfig fields as sent, plus the seed drawn when none was sent
    suffix: str  # ".wav", ".flac", ".ogg"
    timeout: float  # seconds from `received` (> 0: RequestSchema checked it)
    received: float  # time.monotonic() on this process's clock (a model replica re-bases it: serve.deployment)
    stream: bool = False  # send the audio as windows complete (a WAV of unstated length, chunked)

    def left(self, why: str = "") -> float:
        """Seconds left before the deadline; none left: HTTPError 504 (`why`: what the time went on)."""
        left = self.received + self.timeout - time.monotonic()
        if left <= 0:
            raise HTTPError.timed_out(f"the request's timeout of {self.timeout} s passed{why}")
        return left


@dataclass(frozen=True)
class Answer:
    """A generate request's answer as plain data: what crosses from a model replica to the ingress (pickled by
    Ray), and the Response it becomes there."""

    status: int
    body: bytes
    media_type: str
    headers: dict[str, str]

    @classmethod
    def of(cls, response: Response) -> Answer:
        headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
        return cls(response.status_code, bytes(response.body), response.media_type or "", headers)

    @classmethod
    def error(cls, e: HTTPError) -> Answer:
        return cls.of(e.response())

    def response(self, **headers: str) -> Response:
        return Response(self.body, status_code=self.status, media_type=self.media_type,
                        headers=self.headers | headers)


class Front(Protocol):
    """What the HTTP app serves from (`build_app`): a `Service` in this process, or the ingress deployment's
    `serve.ingress.Ingress`, which calls model replicas through Ray and retries on a survivor when one dies."""

    config: ServiceConfig
    metrics: Metrics | None
    schema: RequestSchema

    async def generate(self, job: Job, as_json: bool) -> Response: ...

    async def stream(self, job: Job) -> Response: ...

    async def health(self) -> tuple[bool, int, int]: ...  # (alive, waiting, decoding)

    async def describe(self) -> dict[str, Any]: ...


class RequestSchema:
    """The body of POST /v1/generate for one served model: a pydantic model generated from the engine's rules
    (engine.request.request_rules: GenerationConfig's fields tightened by the request checks, for this model) and
    the HTTP keys' rules, so that its JSON Schema, in the OpenAPI document, states exactly what the server takes.
    `parse` reads a body into a Job through that model; a refusal is the documented JSON 422 (400: not JSON) with
    the engine's message for the key at fault. The scheduler still checks the request as a whole (Scheduler.submit)."""

    def __init__(self, config: ServiceConfig, model: ModelConfig, defaults: GenerationConfig) -> None:
        from magnet_engine.engine.audio import FORMATS
        from magnet_engine.engine.request import request_rules

        self.config = config
        # the HTTP keys beside the generation settings, as rules too (one check, one message)
        self.rules: dict[str, Rule] = {
            "format": Rule("choice", choices=tuple(s.lstrip(".") for s in FORMATS)),
            "timeout": Rule("real", low=0.0, above=True, hint=" (seconds from arrival)"),
            "stream": Rule("bool"),
            **request_rules(model)}
        self.defaults = {"format": "wav", "timeout": config.timeout, "stream": False,
                         **_json_ready(dataclasses.asdict(defaults))}
        self.model = request_model(config, self.rules, self.defaults)

    def json_schema(self) -> dict[str, Any]:
        return self.model.model_json_schema()

    def parse(self, raw: bytes, received: float) -> Job:
        """The request body -> a Job (HTTPError 413, 400 or 422)."""
        from pydantic import ValidationError

        if len(raw) > self.config.max_body:
            raise HTTPError(413, f"the request body is {len(raw)} bytes; the limit is {self.config.max_body}")
        try:
            body = self.model.model_validate_json(raw)
        except ValidationError as e:
            raise self.refusal(raw, e) from None
        sent = body.model_fields_set
        fmt, stream = body.format, body.stream  # type: ignore[attr-defined]
        if stream and fmt != "wav":  # stated in the schema by STREAMS_WAV
            raise HTTPError.setting(SettingError(f"<stream> sends WAV (PCM that plays as it arrives), not {fmt}: drop "
                                                 "\"format\" or turn streaming off"))
        fields = {k: getattr(body, k) for k in sent if k not in ("prompt", *HTTP_KEYS)}
        if fields.get("seed") is None:  # drawn here, so the response can say which seed reproduces it
            fields["seed"] = secrets.randbelow(MAX_SEED + 1)
        return Job(body.prompt, fields, "." + fmt, body.timeout, received, stream)  # type: ignore[attr-defined]

    def refusal(self, raw: bytes, e: Any) -> HTTPError:
        """A pydantic ValidationError -> the HTTPError to answer: 400 for a body that is not a JSON object, else 422
        naming the first key at fault, with its rule's message (the engine's, as the CLI shows it)."""
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            return HTTPError(400, f"the request body is not valid JSON ({err['msg']}); send a JSON object")
        if not err["loc"]:
            return HTTPError(400, f"the request body must be a JSON object, got {err['input']!r:.80}")
        key = str(err["loc"][0])
        if err["type"] == "extra_forbidden":
            return HTTPError(422, f"unknown key {key!r}: this endpoint takes {', '.join(self.model.model_fields)}")
        if key == "prompt" and err["type"] == "missing":
            return HTTPError.setting(SettingError("no <prompts> given: send the text to generate (or null for a "
                                                  "sample without text)"))
        try:
            value = json.loads(raw)[key]  # a JSON object that pydantic parsed, so the key is there
            if key == "prompt":
                check_prompts([value])
                if len(value) > self.config.max_prompt_chars:
                    raise SettingError(f"<prompts> is {len(value)} characters long; this server takes at most "
                                       f"{self.config.max_prompt_chars}")
            else:
                self.rules[key].check(key, value)
        except SettingError as refused:
            return HTTPError.setting(refused)
        except (ValueError, KeyError):  # a body json reads otherwise than pydantic: pydantic's message
            pass
        # the rule took what pydantic refused: a gap between them, still answered as a 422
        log.warning("magnet: pydantic refused %s where its rule took it: %s", key, err["msg"])
        return HTTPError(422, f"{'.'.join(map(str, err['loc']))}: {err['msg']}", key)


class Service:
    """One replica's engine behind the request scheduler; the model is loaded by the scheduler's loop thread (the
    fast way on CPU, see engine/scheduler.py)."""

    def __init__(self, config: ServiceConfig, metrics: Metrics | None = None, replica: str = "") -> None:
        """`replica`: a name for the X-Replica header (serve.deployment: node and replica id), for tracing routing."""
        from magnet_engine.engine.audio import OutputConfig
        from magnet_engine.engine.scheduler import Scheduler

        self.config, self.metrics, self.replica = config, metrics, replica
        self.output = OutputConfig()  # what `magnet generate` writes by default: the same bytes for the same seed
        self.scheduler = Scheduler(self._load, **scheduler_limits(config))
        self.engine: Engine = self.scheduler.engine
        self.schema = RequestSchema(config, self.engine.config, self.engine.defaults)
        self.latency_ewma = 0.0  # seconds, for Retry-After

    def _load(self) -> Engine:
        import torch

        import magnet_engine as me

        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        return me.load(self.config.model, device=self.config.device, graph=self.config.graph,
                       deterministic=self.config.deterministic)

    def close(self) -> None:
        """Finish what is queued and in flight, then stop the loop thread."""
        self.scheduler.close()

    async def generate(self, job: Job, as_json: bool = False) -> Response:
        """Queue a job and wait for its answer, rendered by the scheduler's loop thread (`render`); failures as
        HTTPError (4xx for the request, 5xx for the server)."""
        from magnet_engine.engine.scheduler import RequestTimeout

        with self._queueing():
            future = self.scheduler.submit(job.prompt, timeout=job.left(),
                                           render=functools.partial(self.render, job, as_json=as_json), **job.fields)
        try:
            return await asyncio.wrap_future(future)
        except SettingError as e:
            raise HTTPError.setting(e) from None
        except RequestTimeout as e:
            raise HTTPError.timed_out(str(e)) from None
        except asyncio.CancelledError:
            if future.cancelled():  # cancelled by the scheduler's shutdown, not by this handler's caller
                raise HTTPError(503, "the server shut down before the request started; retry",
                                headers={"Retry-After": "1"}) from None
            future.cancel()  # its caller gave up (the ingress past the deadline): a queued job leaves the queue
            raise

    def open_stream(self, job: Job) -> tuple[dict[str, str], typing.AsyncIterator[bytes]]:
        """A streamed request, queued at once (HTTPError if refused): its headers, and its bytes as windows complete:
        a 16-bit PCM WAV header that leaves the length open (0xFFFFFFFF, as streamed WAVs do), then each window's
        samples, one item per window (the same items for the same request: the ingress resumes a stream by
        position). Not normalised (the piece's peak is not known until its end): the model's own level, clipped to
        [-1, 1]; the samples are those of `generate`'s audio. A fault mid-way raises out of the iterator, so the
        connection ends without the chunked terminator: a client sees a broken transfer, never a short clean WAV."""
        from magnet_engine.engine.audio import pcm16_bytes, wav_stream_header

        with self._queueing():
            try:  # the loop thread turns each chunk into PCM: no tensor work on the event loop
                stream = self.scheduler.stream(job.prompt, timeout=job.left(),
                                               render=lambda chunk: pcm16_bytes(chunk.audio[0]), **job.fields)
            except SettingError as e:  # `stream` checks at once (submit fails its future instead)
                raise HTTPError.setting(e) from None
        sr = self.engine.sample_rate

        async def body() -> typing.AsyncIterator[bytes]:
            try:
                yield wav_stream_header(sr)
                while (pcm := await asyncio.to_thread(stream.next_chunk)) is not None:
                    if pcm:
                        yield pcm
            except Exception:
                log.exception("magnet: a streamed request failed mid-way")
                raise
            finally:
                stream.cancel()  # a client that hung up frees the loop at the next window

        headers = {"X-Seed": str(job.fields["seed"])} | ({"X-Replica": self.replica} if self.replica else {})
        return headers, body()

    async def stream(self, job: Job) -> Response:
        """The audio as windows complete (`open_stream`), chunked."""
        from starlette.responses import StreamingResponse

        headers, body = self.open_stream(job)
        return StreamingResponse(body, media_type=MEDIA_TYPES[".wav"], headers=headers)

    async def health(self) -> tuple[bool, int, int]:
        waiting, active = self.scheduler.counts()
        return self.scheduler.alive, waiting, active

    @contextlib.contextmanager
    def _queueing(self) -> typing.Iterator[None]:
        """Handing a request to the scheduler: a full queue or a closing replica -> 503 with Retry-After."""
        from magnet_engine.engine.scheduler import QueueFull, SchedulerClosed

        try:
            yield
        except QueueFull as e:
            raise HTTPError(503, str(e), headers={"Retry-After": str(self.retry_after())}) from None
        except SchedulerClosed:  # the replica is shutting down
            raise HTTPError(503, "the server is shutting down; retry", headers={"Retry-After": "1"}) from None

    def retry_after(self) -> int:
        """Seconds until a queue slot frees, roughly: one request's latency."""
        return max(1, round(self.latency_ewma))

    def render(self, job: Job, out: Generation, as_json: bool) -> Response:
        """The audio as `magnet generate` writes it (same normalisation and WAV subtype), or JSON with the tokens.
        Run by the scheduler's loop thread (the thread that runs torch), never on the event loop."""
        from magnet_engine.engine.audio import audio_bytes, normalize

        latency_s = out.stats.get("latency_s", 0.0)
        self.latency_ewma = latency_s if not self.latency_ewma else 0.8 * self.latency_ewma + 0.2 * latency_s
        sr = out.sample_rate
        wav = normalize(out.audio[0].cpu(), sr, self.output.normalize)  # [1, samples]
        data = audio_bytes(wav, sr, job.suffix, self.output.wav_subtype)
        duration = wav.shape[-1] / sr
        latency = time.monotonic() - job.received
        headers = {"X-Seed": str(job.fields["seed"]), "X-Audio-Duration": f"{duration:.6g}",
                   "X-Latency": f"{latency:.6g}", "X-Queue-Time": f"{out.stats.get('queue_s', 0.0):.6g}"}
        if self.replica:
            headers["X-Replica"] = self.replica
        if as_json:
            body = {"seed": job.fields["seed"], "sample_rate": sr, "duration": duration, "latency_s": latency,
                    "format": job.suffix[1:], "tokens": out.codes[0].tolist(),  # [K, T]
                    "audio": base64.b64encode(data).decode("ascii")}
            return JSONResponse(body, headers=headers)
        return Response(data, media_type=MEDIA_TYPES[job.suffix], headers=headers)

    async def describe(self) -> dict[str, Any]:
        """GET /v1/model: what the replica serves and with which limits."""
        eng = self.engine
        return {"model": self.config.model or "default", "kind": eng.config.kind, "config": eng.config.to_dict(),
                "sample_rate": eng.sample_rate, "segment": eng.config.segment_duration, "max_duration": MAX_DURATION,
                "defaults": _json_ready(dataclasses.asdict(eng.defaults)),
                "limits": {**scheduler_limits(self.config), "max_frames": self.scheduler.max_frames,
                           "timeout": self.config.timeout,
                           "max_body": self.config.max_body, "max_prompt_chars": self.config.max_prompt_chars}}


def _json_ready(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


HTTP_KEYS = ("format", "timeout", "stream")  # the body's keys beside the prompt and the generation settings
# the cross-key rule the parser enforces (RequestSchema.parse), in JSON Schema: a stream is a WAV
STREAMS_WAV = {"anyOf": [{"properties": {"stream": {"const": False}}}, {"properties": {"format": {"const": "wav"}}}]}
DESCRIPTIONS = {
    "prompt": "what to generate; null: a sample without text",
    "format": "the audio format of the answer",
    "timeout": "seconds from arrival; past it the request fails with 504",
    "stream": "send a WAV as windows complete (chunked; not normalised)",
    "duration": "seconds; past the model's segment the piece is generated window by window",
    "seed": "the same seed and settings give the same audio; drawn when absent, and answered in X-Seed",
}


def _annotation(rule: Rule) -> Any:
    """A Rule as a pydantic type: the same type, range, choices and lengths (the model is strict: no coercion)."""
    t: Any
    if rule.kind == "int":  # JSON's 3.0 is the integer 3 (JSON Schema, and the engine's check_int)
        # (the constraints before the validator: after it, pydantic writes them into the schema as "ge"/"le")
        t = Annotated[int, Field(ge=int(rule.low or 0), le=rule.high),
                      BeforeValidator(lambda v: int(v) if isinstance(v, float) and whole(v) else v)]
    elif rule.kind == "real":
        bound = {"gt": rule.low} if rule.above else {"ge": rule.low}
        t = Annotated[float, Field(le=rule.high, allow_inf_nan=False, **bound)]
    elif rule.kind == "bool":
        t = bool
    elif rule.kind == "choice":
        t = Literal[rule.choices]  # type: ignore[valid-type]
    else:
        assert rule.kind == "list" and rule.item is not None
        sizes = rule.sizes or (1,)
        assert list(sizes) == list(range(min(sizes), max(sizes) + 1)), "JSON Schema states a range of lengths"
        t = Annotated[list[_annotation(rule.item)], Field(min_length=min(sizes),
                                                          max_length=max(sizes) if rule.sizes else None)]
    return t | None if rule.nullable else t


def request_model(config: ServiceConfig, rules: dict[str, Rule], defaults: dict[str, Any]) -> type[BaseModel]:
    """The body of POST /v1/generate as a strict pydantic model: the prompt, then each key's rule as its type, with
    its default (generated, so it cannot drift from the engine's checks)."""
    from magnet_engine.engine.request import PROMPT_PATTERN

    # `re`'s whitespace is str.isspace, which the engine's prompt check uses (pydantic's default engine differs)
    model_config = ConfigDict(extra="forbid", strict=True, regex_engine="python-re", json_schema_extra=STREAMS_WAV)
    prompt = Annotated[str, StringConstraints(max_length=config.max_prompt_chars, pattern=PROMPT_PATTERN)] | None
    keys: dict[str, Any] = {
        name: (_annotation(rule), Field(default=defaults[name], description=DESCRIPTIONS.get(name)))
        for name, rule in rules.items()}
    return create_model("GenerateRequest", __config__=model_config,
                        prompt=(prompt, Field(description=DESCRIPTIONS["prompt"])), **keys)


def _json(schema: dict[str, Any], description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """An OpenAPI response with a JSON body (and headers)."""
    return {"description": description, "content": {"application/json": {"schema": schema}}} | (
        {"headers": headers} if headers else {})


_STRING = {"type": "string"}
_COUNT = {"type": "integer", "minimum": 0}
ERROR = {"type": "object", "required": ["error"], "additionalProperties": False,
         "properties": {"error": {**_STRING, "description": "what went wrong and what to send instead"},
                        "field": {**_STRING, "description": "the JSON key at fault, when one is"}}}
FAULT = {"type": "object", "required": ["error", "request_id"], "additionalProperties": False,
         "properties": {"error": _STRING, "request_id": {**_STRING, "description": "the id the server logged the "
                                                                                   "fault under (X-Request-Id)"}}}
HEALTH = {"type": "object", "required": ["status", "waiting", "decoding"], "additionalProperties": False,
          "properties": {"status": {"enum": ["ok", "down"]}, "waiting": _COUNT, "decoding": _COUNT}}
_NUMBER = {"type": "number"}
MODEL = {"type": "object", "additionalProperties": False,
         "required": ["model", "kind", "config", "sample_rate", "segment", "max_duration", "defaults", "limits"],
         "properties": {"model": _STRING, "kind": {"enum": ["magnet", "musicgen"]},
                        "config": {"type": "object", "description": "the language model's shape (ModelConfig)"},
                        "sample_rate": _COUNT, "segment": _NUMBER, "max_duration": _NUMBER,
                        "defaults": {"type": "object", "description": "the model's generation defaults "
                                                                      "(GenerationConfig)"},
                        "limits": {"type": "object", "additionalProperties": _NUMBER,
                                   "required": ["max_batch", "max_queue", "max_streams", "max_frames", "timeout",
                                                "max_body", "max_prompt_chars"]}}}
GENERATED = {"type": "object", "additionalProperties": False,
             "required": ["seed", "sample_rate", "duration", "latency_s", "format", "tokens", "audio"],
             "properties": {"seed": _COUNT, "sample_rate": _COUNT, "duration": _NUMBER, "latency_s": _NUMBER,
                            "format": {"enum": [s.lstrip(".") for s in MEDIA_TYPES]},
                            "tokens": {"type": "array", "description": "[K, T] EnCodec tokens",
                                       "items": {"type": "array", "items": _COUNT}},
                            "audio": {**_STRING, "contentEncoding": "base64"}}}
_HEADER_NUMBER = {"schema": _NUMBER}
RETRY_AFTER = {"Retry-After": {"required": True, "description": "seconds to wait before retrying",
                               "schema": {"type": "integer", "minimum": 1}}}


def responses(*, generate: bool, auth: bool) -> dict[int | str, dict[str, Any]]:
    """What an operation can answer, for the OpenAPI document: 401 only where a key is configured; the body's
    statuses (400, 413, 422) and the queue's (503, 504) for POST /v1/generate only."""
    out: dict[int | str, dict[str, Any]] = {}
    if generate:
        audio = {media: {"schema": {"type": "string", "format": "binary"}} for media in MEDIA_TYPES.values()}
        out[200] = {"description": "the audio (a WAV of open length, chunked, with \"stream\": true); JSON with the "
                                   "tokens and base64 audio for Accept: application/json",
                    "content": {**audio, "application/json": {"schema": GENERATED}},
                    "headers": {"X-Seed": {"required": True, "schema": {"type": "integer", "minimum": 0},
                                           "description": "the seed that reproduces this audio"},
                                "X-Audio-Duration": _HEADER_NUMBER, "X-Latency": _HEADER_NUMBER,
                                "X-Queue-Time": _HEADER_NUMBER, "X-Replica": {"schema": _STRING},
                                "X-Retries": {"schema": _COUNT, "description": "times the request was sent again "
                                                                               "after its model replica died"}}}
        out[400] = _json(ERROR, "the body is not a JSON object")
    if auth:
        out[401] = _json(ERROR, "missing or wrong API key", {"WWW-Authenticate": {"required": True,
                                                                                    "schema": _STRING}})
    if generate:
        out[413] = _json(ERROR, "the body is larger than the server takes")
        out[422] = _json(ERROR, "a bad key or value, named in \"field\"")
    out[500] = _json(FAULT, "a server fault: a request id, the details are in the server's log")
    if generate:
        out[503] = _json(ERROR, "the replica's queue is full or it is shutting down: retry after Retry-After "
                                "seconds", RETRY_AFTER)
        out[504] = _json(ERROR, "past the request's timeout")
    return out


def build_app(front: Front) -> FastAPI:
    """The FastAPI app over a `Front` (routes in module docstring); its OpenAPI document states what each route
    takes and answers (tests/test_serve_openapi.py checks it with Schemathesis)."""
    app = FastAPI(title="magnet-engine", description="Text to music and sound with MAGNeT.", version="1")
    config = front.config
    auth = config.api_key_sha256 is not None
    guarded: list[Any] = []
    if auth:  # declared (a security scheme, 401 answers) only when a key is configured
        bearer = HTTPBearer(auto_error=False, description="the key of --api-key-file")

        def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
            if not config.key_matches(None if credentials is None else credentials.credentials):
                raise HTTPError(401, "missing or wrong API key: send the header Authorization: Bearer KEY",
                                headers={"WWW-Authenticate": "Bearer"})

        guarded = [Depends(authorized)]

    @app.exception_handler(HTTPError)
    async def http_error(request: Request, e: HTTPError) -> Response:
        return e.response()

    @app.exception_handler(Exception)
    async def server_fault(request: Request, e: Exception) -> Response:
        """A server fault: the client gets a request id and a generic message, the log the traceback. (Starlette
        then re-raises it to the server, which logs it as a failed request: the answer is already sent.)"""
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        log.error("magnet: request %s (%s %s) failed", rid, request.method, request.url.path, exc_info=e)
        return JSONResponse({"error": f"internal error (request id {rid}); the server logged it",
                             "request_id": rid}, status_code=500)

    if front.metrics is not None:
        metrics = front.metrics

        @app.middleware("http")
        async def timed(request: Request, call_next: Any) -> Response:
            t0 = time.monotonic()
            try:
                response = await call_next(request)
            except Exception:
                metrics.request(500, time.monotonic() - t0)  # answered by `server_fault`
                raise
            metrics.request(response.status_code, time.monotonic() - t0)
            return response

    schema = front.schema
    body_schema = schema.json_schema()  # inlined: the model has no nested models, so no $defs

    @app.post("/v1/generate", summary="Generate audio from text", dependencies=guarded,
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"application/json": {"schema": body_schema}}}},
              responses=responses(generate=True, auth=auth))
    async def generate(request: Request) -> Response:
        received = time.monotonic()
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_body:
            raise HTTPError(413, f"the request body is {declared} bytes; the limit is {config.max_body}")
        raw = bytearray()
        async for chunk in request.stream():  # bounded read: a chunked body may not say its length
            raw += chunk
            if len(raw) > config.max_body:
                raise HTTPError(413, f"the request body is over the limit of {config.max_body} bytes")
        job = schema.parse(bytes(raw), received)
        if job.stream:
            return await front.stream(job)
        return await front.generate(job, "application/json" in request.headers.get("accept", ""))

    @app.get("/v1/health", summary="200 once the replica's model is loaded and its scheduler runs",
             responses={200: _json(HEALTH, "the scheduler runs"), 503: _json(HEALTH, "the scheduler stopped"),
                        **responses(generate=False, auth=False)})
    async def health() -> Response:
        ok, waiting, active = await front.health()
        return JSONResponse({"status": "ok" if ok else "down", "waiting": waiting, "decoding": active},
                            status_code=200 if ok else 503)

    @app.get("/v1/model", summary="the model's config, generation defaults and the service's limits",
             dependencies=guarded, responses={200: _json(MODEL, "what the replica serves"),
                                              **responses(generate=False, auth=auth)})
    async def describe() -> Response:
        return JSONResponse(await front.describe())

    @app.get("/", include_in_schema=False)
    async def page() -> Response:  # static: the key, when there is one, is asked for by the page's own calls
        import pathlib

        return Response((pathlib.Path(__file__).parent / "page.html").read_bytes(), media_type="text/html")

    return app
