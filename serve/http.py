"""The HTTP API of one replica, without Ray: a `Service` (an Engine behind the request scheduler) and `build_app`, the
FastAPI app around it. serve.deployment wraps both in a Ray Serve deployment.

    POST /v1/generate  JSON {prompt, GenerationConfig fields, format, timeout, stream} -> audio (or JSON with
                       Accept); "stream": true sends a WAV with chunked transfer, a window at a time
    GET  /v1/health    200 while the scheduler's loop runs
    GET  /v1/model     the model's config and generation defaults, the service's limits
    GET  /openapi.json the request schema, built from GenerationConfig
    GET  /             a page with a form that calls /v1/generate (serve/page.html)

A request is checked once, by `Scheduler.submit` (engine.request); this module only reads the HTTP envelope (size,
JSON, the keys that are not generation settings) and spells the engine's SettingErrors with JSON keys.

The generate route is two steps: `parse_job` (body -> Job), `Service.generate` (Job -> Response: the scheduler
decodes, and its loop thread renders the audio with `Service.render`, so normalisation and encoding never run on
the event loop, nor torch on a second thread); a streamed one uses `Service.stream` (Scheduler.stream's chunks as
they complete, turned into PCM by the loop thread, behind the same envelope and errors).

Errors: an `HTTPError` is answered as JSON {"error", "field"} by an exception handler; anything else is a 500
whose body carries only a request id and a generic message, the traceback going to the log under that id. The
API key is checked by an HTTPBearer dependency; the OpenAPI request schema is a pydantic model generated from
GenerationConfig's fields (`request_model`), documentation only: the engine does the checking (engine.request).
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
from magnet_engine.engine.config import MAX_DURATION, MAX_SEED, GenerationConfig, SettingError, SettingTypeError
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model
from starlette.responses import JSONResponse, Response

from .config import HTTP_NAMES, ServiceConfig, scheduler_limits

if TYPE_CHECKING:
    from magnet_engine.engine.api import Engine, Generation

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
    timeout: Any  # seconds (checked by the scheduler)
    received: float  # time.monotonic()
    stream: bool = False  # send the audio as windows complete (a WAV of unstated length, chunked)


def parse_job(raw: bytes, config: ServiceConfig, received: float) -> Job:
    """The request body -> a Job: size, JSON object, the HTTP keys; GenerationConfig fields are passed on as sent."""
    from magnet_engine.engine.audio import check_format

    if len(raw) > config.max_body:
        raise HTTPError(413, f"the request body is {len(raw)} bytes; the limit is {config.max_body}")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise HTTPError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(body, dict):
        raise HTTPError(400, f"the request body must be a JSON object, got a JSON {type(body).__name__}")
    if "prompt" not in body:
        raise HTTPError.setting(SettingError("no <prompts> given: send the text to generate (or null for a sample "
                                             "without text)"))
    prompt = body.pop("prompt")
    if isinstance(prompt, str) and len(prompt) > config.max_prompt_chars:
        raise HTTPError.setting(SettingError(f"<prompts> is {len(prompt)} characters long; this server takes at "
                                             f"most {config.max_prompt_chars}"))
    fmt = body.pop("format", "wav")
    if not isinstance(fmt, str):
        raise HTTPError.setting(SettingTypeError(f"<format> must be a text (wav, flac or ogg), got {fmt!r}"))
    try:
        check_format("." + fmt)
    except SettingError as e:
        raise HTTPError.setting(e) from None
    timeout = body.pop("timeout", None)
    stream = body.pop("stream", False)
    if not isinstance(stream, bool):
        raise HTTPError.setting(SettingTypeError(f"<stream> must be true or false, got {stream!r}"))
    if stream and fmt.lower() != "wav":
        raise HTTPError.setting(SettingError(f"<stream> sends WAV (PCM that plays as it arrives), not {fmt}: drop "
                                             "\"format\" or turn streaming off"))
    if body.get("seed") is None:  # drawn here, so the response can say which seed reproduces it
        body["seed"] = secrets.randbelow(MAX_SEED + 1)
    return Job(prompt, body, "." + fmt.lower(), config.timeout if timeout is None else timeout, received, stream)


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
            future = self.scheduler.submit(job.prompt, timeout=job.timeout,
                                           render=functools.partial(self.render, job, as_json=as_json), **job.fields)
        try:
            return await asyncio.wrap_future(future)
        except SettingError as e:
            raise HTTPError.setting(e) from None
        except RequestTimeout as e:
            raise HTTPError(504, f"{e}; send a larger \"timeout\" (seconds) or a shorter request", "timeout") from None
        except asyncio.CancelledError:
            if future.cancelled():  # cancelled by the scheduler's shutdown, not by this handler's caller
                raise HTTPError(503, "the server shut down before the request started; retry",
                                headers={"Retry-After": "1"}) from None
            raise

    def stream(self, job: Job) -> Response:
        """The audio as windows complete: a 16-bit PCM WAV whose header leaves the length open (0xFFFFFFFF, as
        streamed WAVs do), then each chunk's samples. Not normalised (the piece's peak is not known until its end):
        the model's own level, clipped to [-1, 1]; the samples are those of `generate`'s audio."""
        from magnet_engine.engine.audio import pcm16_bytes, wav_stream_header
        from starlette.responses import StreamingResponse

        with self._queueing():
            try:  # the loop thread turns each chunk into PCM: no tensor work on the event loop
                stream = self.scheduler.stream(job.prompt, timeout=job.timeout,
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
            except Exception:  # noqa: BLE001 - the status is sent: the answer ends short, the fault is logged
                log.exception("magnet: a streamed request failed mid-way")
            finally:
                stream.cancel()  # a client that hung up frees the loop at the next window

        headers = {"X-Seed": str(job.fields["seed"])} | ({"X-Replica": self.replica} if self.replica else {})
        return StreamingResponse(body(), media_type=MEDIA_TYPES[".wav"], headers=headers)

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

    def describe(self) -> dict[str, Any]:
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


def request_model(config: ServiceConfig, defaults: GenerationConfig) -> type[BaseModel]:
    """The body of POST /v1/generate as a pydantic model, for the OpenAPI document: the HTTP keys, then every
    GenerationConfig field with its type and this model's default (generated, so it cannot drift from the
    dataclass). Bodies are not validated with it: the engine checks them once, with its own messages."""
    from magnet_engine.engine.audio import FORMATS

    hints = typing.get_type_hints(GenerationConfig)
    settings: dict[str, Any] = {f.name: (hints[f.name], Field(default=getattr(defaults, f.name)))
                                for f in dataclasses.fields(GenerationConfig)}
    formats = Literal[tuple(s.lstrip(".") for s in FORMATS)]  # type: ignore[valid-type]
    prompt = Annotated[str, StringConstraints(max_length=config.max_prompt_chars)] | None
    return create_model(
        "GenerateRequest", __config__=ConfigDict(extra="forbid"),
        prompt=(prompt, Field(description="what to generate; null: a sample without text")),
        format=(formats, Field(default="wav")),
        timeout=(float, Field(default=config.timeout, gt=0,
                              description="seconds from arrival; past it the request fails with 504")),
        stream=(bool, Field(default=False, description="send a WAV as windows complete (chunked; not normalised)")),
        **settings)


def build_app(service: Service) -> FastAPI:
    """The FastAPI app of one replica (routes in module docstring)."""
    app = FastAPI(title="magnet-engine", description="Text to music and sound with MAGNeT.", version="1")
    config = service.config
    bearer = HTTPBearer(auto_error=False, description="the key of --api-key-file (when the server has one)")

    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if not config.key_matches(None if credentials is None else credentials.credentials):
            raise HTTPError(401, "missing or wrong API key: send the header Authorization: Bearer KEY",
                            headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(HTTPError)
    async def http_error(request: Request, e: HTTPError) -> Response:
        body = {"error": e.message} | ({"field": e.field} if e.field else {})
        return JSONResponse(body, status_code=e.status, headers=e.headers)

    @app.exception_handler(Exception)
    async def server_fault(request: Request, e: Exception) -> Response:
        """A server fault: the client gets a request id and a generic message, the log the traceback. (Starlette
        then re-raises it to the server, which logs it as a failed request: the answer is already sent.)"""
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        log.error("magnet: request %s (%s %s) failed", rid, request.method, request.url.path, exc_info=e)
        return JSONResponse({"error": f"internal error (request id {rid}); the server logged it",
                             "request_id": rid}, status_code=500)

    if service.metrics is not None:
        metrics = service.metrics

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

    model = request_model(config, service.engine.defaults)
    audio_types = {media: {"schema": {"type": "string", "format": "binary"}} for media in MEDIA_TYPES.values()}
    # the model's own schema, inlined (no nested models: no $defs)
    body_schema = model.model_json_schema()

    @app.post("/v1/generate", summary="Generate audio from text", dependencies=[Depends(authorized)],
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"application/json": {"schema": body_schema}}}},
              responses={200: {"content": {**audio_types, "application/json": {}},
                               "description": "the audio; JSON with tokens and base64 audio for Accept: "
                                              "application/json"},
                         401: {"description": "missing or wrong API key"}, 413: {"description": "body too large"},
                         422: {"description": "a bad field, named in the error"},
                         500: {"description": "a server fault: a request id, the details are in the log"},
                         503: {"description": "queue full: retry after Retry-After seconds"},
                         504: {"description": "past the request's timeout"}})
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
        job = parse_job(bytes(raw), config, received)
        if job.stream:
            return service.stream(job)
        return await service.generate(job, "application/json" in request.headers.get("accept", ""))

    @app.get("/v1/health", summary="200 once the replica's model is loaded and its scheduler runs")
    async def health() -> Response:
        waiting, active = service.scheduler.counts()
        ok = service.scheduler.alive
        return JSONResponse({"status": "ok" if ok else "down", "waiting": waiting, "decoding": active},
                            status_code=200 if ok else 503)

    @app.get("/v1/model", summary="the model's config, generation defaults and the service's limits",
             dependencies=[Depends(authorized)])
    async def describe() -> Response:
        return JSONResponse(service.describe())

    @app.get("/", include_in_schema=False)
    async def page() -> Response:  # static: the key, when there is one, is asked for by the page's own calls
        import pathlib

        return Response((pathlib.Path(__file__).parent / "page.html").read_bytes(), media_type="text/html")

    return app
