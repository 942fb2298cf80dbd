"""The ingress' retry rules without a cluster: `serve.ingress.Ingress` over a stand-in DeploymentHandle whose calls
fail the way Ray's do when a replica dies (ActorDiedError, ActorUnavailableError, an actor error inside a task), or
answer the replica's refusals. tests/test_serve.py SIGKILLs a real replica under load."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

FAST = {"steps": [2, 1, 1, 1]}


def died() -> Exception:
    from ray.exceptions import ActorDiedError

    return ActorDiedError()


def unavailable() -> Exception:
    from ray.exceptions import ActorUnavailableError

    return ActorUnavailableError("the replica's node is gone", None)


def task_error(cause: Exception) -> Exception:
    from ray.exceptions import RayTaskError

    return RayTaskError("generate", "Traceback: ...", cause)


class Call:
    """A handle call: awaitable, cancellable; `outcome` is returned, raised, or (a float) slept before 'never'."""

    def __init__(self, outcome: Any) -> None:
        self.outcome, self.cancelled = outcome, False

    def cancel(self) -> None:
        self.cancelled = True

    def __await__(self):  # noqa: ANN204
        return self._run().__await__()

    async def _run(self) -> Any:
        if isinstance(self.outcome, float):
            await asyncio.sleep(self.outcome)
            raise AssertionError("a call the ingress should have given up on")
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


class Stream:
    """A streaming handle call: its items, then (optionally) an error raised in place of the next one."""

    def __init__(self, items: list[Any], then: Exception | None = None) -> None:
        self.items, self.then, self.cancelled = list(items), then, False

    def cancel(self) -> None:
        self.cancelled = True

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Any:
        if self.items:
            return self.items.pop(0)
        if self.then is not None:
            raise self.then
        raise StopAsyncIteration


class Handle:
    """A stand-in DeploymentHandle: each method answers from its script of outcomes, in order; records the calls."""

    def __init__(self, **scripts: list[Any]) -> None:
        self.scripts, self.calls = scripts, []
        self._stream = False

    def options(self, stream: bool = False) -> Handle:
        clone = Handle.__new__(Handle)
        clone.scripts, clone.calls, clone._stream = self.scripts, self.calls, stream
        return clone

    def __getattr__(self, method: str) -> Any:
        scripts, calls, streaming = self.__dict__["scripts"], self.__dict__["calls"], self.__dict__["_stream"]

        class Method:
            @staticmethod
            def remote(*args: Any) -> Any:
                calls.append((method, args))
                outcome = scripts[method].pop(0)
                assert streaming == isinstance(outcome, Stream), "stream calls go through options(stream=True)"
                return outcome if streaming else Call(outcome)

        return Method


@pytest.fixture(scope="module")
def model(fixture_dir: Path) -> tuple[Any, Any]:
    """The fixture model's config and defaults: what the ingress builds its schema from."""
    import magnet_engine as me

    eng = me.load(str(fixture_dir), device="cpu")
    return eng.config, eng.defaults


def ingress(model: tuple[Any, Any], handle: Handle, **config: Any) -> Any:
    from magnet_engine.serve.config import ServiceConfig
    from magnet_engine.serve.ingress import Ingress

    retried: list[int] = []
    metrics = type("M", (), {"request": lambda self, status, latency: None,
                             "retried": lambda self: retried.append(1)})()
    front = Ingress(ServiceConfig(**config), handle, *model, metrics)
    front.retried = retried
    return front


def answer(status: int = 200, body: bytes = b"RIFF-audio", **headers: str) -> Any:
    from magnet_engine.serve.http import Answer

    return Answer(status, body, "audio/wav" if status == 200 else "application/json", {"x-seed": "7", **headers})


def job(front: Any, **body: Any) -> Any:
    return front.schema.parse(json.dumps({"prompt": "rain", **FAST, **body}).encode(), time.monotonic())


@pytest.mark.parametrize("death", [died, unavailable, lambda: task_error(died())])
def test_a_replica_death_is_retried_with_the_same_job(model, death):
    """Each way a replica's death surfaces: the same Job (same seed, drawn once) goes again; X-Retries counts."""
    handle = Handle(generate=[death(), death(), answer()])
    front = ingress(model, handle)
    j = job(front)
    response = asyncio.run(front.generate(j, False))
    assert response.status_code == 200 and response.body == b"RIFF-audio"
    assert response.headers["x-retries"] == "2" and front.retried == [1, 1]
    jobs = [args[0] for _, args in handle.calls]
    assert len(jobs) == 3 and all(sent is j for sent in jobs) and "seed" in j.fields
    spent = [args[1] for _, args in handle.calls]
    assert spent == sorted(spent) and spent[0] >= 0  # the time already spent travels with it


@pytest.mark.parametrize("outcome", [answer(422, b'{"error": "bad", "field": "cfg"}'),
                                     answer(503, b'{"error": "full"}', **{"retry-after": "3"}),
                                     answer(504, b'{"error": "late", "field": "timeout"}')])
def test_a_replicas_own_answer_is_never_retried(model, outcome):
    """A refusal, a full queue or a deadline answered by a live replica: passed on as it is, once."""
    handle = Handle(generate=[outcome])
    response = asyncio.run(ingress(model, handle).generate(job(ingress(model, handle)), False))
    assert (response.status_code, response.body) == (outcome.status, outcome.body)
    assert response.headers["x-retries"] == "0" and len(handle.calls) == 1
    assert response.headers.get("retry-after") == outcome.headers.get("retry-after")


def test_an_engine_error_is_not_retried(model):
    """A fault inside the replica's code (a task error that is not an actor's death) is raised once: the app's 500."""
    handle = Handle(generate=[task_error(RuntimeError("engine bug")), answer()])
    front = ingress(model, handle)
    from ray.exceptions import RayTaskError

    with pytest.raises(RayTaskError) as e:
        asyncio.run(front.generate(job(front), False))
    assert "engine bug" in str(e.value.cause) and len(handle.calls) == 1 and front.retried == []


def test_the_deadline_passing_while_retrying_is_a_504(model):
    from magnet_engine.serve.http import HTTPError

    handle = Handle(generate=[died()] * 1000)
    front = ingress(model, handle)
    t0 = time.monotonic()
    with pytest.raises(HTTPError) as e:
        asyncio.run(front.generate(job(front, timeout=0.3), False))
    assert e.value.status == 504 and e.value.field == "timeout" and "retries" in e.value.message
    assert 0.3 <= time.monotonic() - t0 < 2 and len(handle.calls) > 1


def test_a_call_that_never_answers_is_cancelled_at_the_deadline(model, monkeypatch):
    from magnet_engine.serve import ingress as ingress_module
    from magnet_engine.serve.http import HTTPError

    monkeypatch.setattr(ingress_module, "GRACE_S", 0.1)
    handle = Handle(generate=[30.0])  # no replica ever picks it up
    front = ingress(model, handle)
    with pytest.raises(HTTPError, match="timeout") as e:
        asyncio.run(front.generate(job(front, timeout=0.2), False))
    assert e.value.status == 504


def test_serves_own_refusals_are_503_at_once(model):
    from magnet_engine.serve.http import HTTPError
    from ray.serve.exceptions import BackPressureError, DeploymentID, DeploymentUnavailableError

    for refusal in (BackPressureError(num_queued_requests=8, max_queued_requests=8),
                    DeploymentUnavailableError(DeploymentID("Model", "magnet"))):
        handle = Handle(generate=[refusal])
        front = ingress(model, handle)
        with pytest.raises(HTTPError) as e:
            asyncio.run(front.generate(job(front), False))
        assert e.value.status == 503 and int(e.value.headers["Retry-After"]) >= 1 and len(handle.calls) == 1


async def _body(response: Any) -> bytes:
    return b"".join([chunk async for chunk in response.body_iterator])


def test_a_stream_resumes_at_the_first_item_its_client_lacks(model):
    """The replica dies after two of four items: the survivor is asked from item 2 on; the client's bytes are the
    whole stream, once each."""
    items = [b"HDR", b"w0", b"w1", b"w2"]
    handle = Handle(stream=[Stream([{"x-seed": "7"}, *items[:2]], then=died()),
                            Stream([{"x-seed": "7"}, *items[2:]])])
    front = ingress(model, handle)
    j = job(front, stream=True)
    response = asyncio.run(front.stream(j))
    assert response.status_code == 200 and response.headers["x-seed"] == "7"
    assert asyncio.run(_body(response)) == b"".join(items)
    assert [args[2] for _, args in handle.calls] == [0, 2] and all(args[0] is j for _, args in handle.calls)
    assert front.retried == [1]


def test_a_client_that_hangs_up_cancels_the_replicas_stream(model):
    """The body closed after one item (the client went away): the handle's stream call is cancelled, so the replica
    stops decoding it and frees its stream slot; a stream read to its end is not."""
    streams = [Stream([{"x-seed": "7"}, b"HDR", b"w0", b"w1"]), Stream([{"x-seed": "7"}, b"HDR"])]
    handle = Handle(stream=list(streams))
    front = ingress(model, handle)

    async def first_item_then_hang_up() -> bytes:
        body = (await front.stream(job(front, stream=True))).body_iterator
        item = await body.__anext__()
        await body.aclose()
        return item

    assert asyncio.run(first_item_then_hang_up()) == b"HDR" and streams[0].cancelled
    response = asyncio.run(front.stream(job(front, stream=True)))
    assert asyncio.run(_body(response)) == b"HDR" and not streams[1].cancelled


def test_a_stream_that_cannot_resume_breaks_instead_of_ending_clean(model):
    """Past the deadline no survivor is asked: the body raises, so the connection ends without the chunked
    terminator (a short WAV that looked complete would be a lie)."""
    from magnet_engine.serve.ingress import StreamCut

    handle = Handle(stream=[Stream([{"x-seed": "7"}, b"HDR"], then=died())] + [Stream([], then=died())] * 100)
    front = ingress(model, handle)
    response = asyncio.run(front.stream(job(front, stream=True, timeout=0.3)))
    with pytest.raises(StreamCut, match="could not resume"):
        asyncio.run(_body(response))


def test_a_refused_stream_is_the_replicas_answer(model):
    refused = answer(503, b'{"error": "full"}', **{"retry-after": "2"})
    handle = Handle(stream=[Stream([refused])])
    front = ingress(model, handle)
    response = asyncio.run(front.stream(job(front, stream=True)))
    assert response.status_code == 503 and response.headers["retry-after"] == "2" and len(handle.calls) == 1


@pytest.fixture(scope="module")
def replica(fixture_dir: Path) -> Any:
    """A model replica's state (serve.deployment.Model) without Serve's replica context: one stream at a time."""
    import threading

    from magnet_engine.serve.config import ServiceConfig
    from magnet_engine.serve.deployment import Model
    from magnet_engine.serve.http import Service

    model = Model.__new__(Model)
    model._stop = threading.Event()
    model.service = Service(ServiceConfig(model=str(fixture_dir), device="cpu", max_streams=1))
    try:
        yield model
    finally:
        model.service.close()


def test_the_model_replica_streams_from_the_item_it_is_asked(replica):
    """The model side of a resumed stream (Model.stream): the headers first, then the items from `skip` on (item 0:
    the WAV header), the same bytes as those items of a stream from the start (same Job, same seed); a refusal comes
    back as an Answer, not an exception."""
    from magnet_engine.engine.audio import wav_stream_header
    from magnet_engine.serve.http import Answer

    j = replica.service.schema.parse(json.dumps({"prompt": "rain", "seed": 3, "duration": 2.5, "stream": True,
                                                 **FAST}).encode(), time.monotonic())

    async def items(skip: int) -> list[Any]:
        return [item async for item in replica.stream(j, 0.0, skip)]

    whole, resumed = asyncio.run(items(0)), asyncio.run(items(2))
    assert whole[0] == resumed[0] and whole[0]["X-Seed"] == "3"  # the headers
    assert len(whole) > 4  # headers, the WAV header, a window at a time (2.5 s past a 1 s segment)
    assert whole[1] == wav_stream_header(replica.service.engine.sample_rate)
    assert resumed[1:] == whole[1 + 2:]

    async def refused() -> Any:
        first = replica.service.open_stream(j)  # holds the one stream slot
        try:
            return [item async for item in replica.stream(j, 0.0, 0)]
        finally:
            await first[1].aclose()

    answer = asyncio.run(refused())
    assert len(answer) == 1 and isinstance(answer[0], Answer) and answer[0].status == 503


def test_the_model_replica_counts_the_time_the_request_already_spent(replica, monkeypatch):
    """A Job arrives with the seconds it spent at the ingress (parsing, earlier tries on a replica that died): the
    replica's scheduler gets what is left of the timeout, and none left is a 504 without queueing."""
    j = replica.service.schema.parse(json.dumps({"prompt": "rain", "timeout": 30, **FAST}).encode(),
                                     time.monotonic())
    given: list[float] = []
    submit = replica.service.scheduler.submit
    monkeypatch.setattr(replica.service.scheduler, "submit",
                        lambda *a, timeout, **kw: given.append(timeout) or submit(*a, timeout=timeout, **kw))
    assert asyncio.run(replica.generate(j, 12.0, False)).status == 200
    assert 17.0 < given[0] <= 18.0
    late = asyncio.run(replica.generate(j, 30.5, False))
    assert late.status == 504 and json.loads(late.body)["field"] == "timeout" and len(given) == 1


def test_the_python_client_reports_the_retries():
    """`Client.generate_result` carries X-Retries (0 when a front does not send it), beside the JSON answer."""
    import base64
    import http.server
    import io
    import threading

    import numpy as np
    import soundfile as sf
    from magnet_engine.serve.client import Client

    wav = io.BytesIO()
    sf.write(wav, np.zeros(320, dtype=np.float32), 32000, format="WAV")
    answer = json.dumps({"seed": 7, "sample_rate": 32000, "duration": 0.01, "latency_s": 0.5, "format": "wav",
                         "tokens": [[1]], "audio": base64.b64encode(wav.getvalue()).decode()}).encode()
    sent: list[dict[str, str]] = [{"X-Retries": "2"}, {}]

    class Front(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            for k, v in {"Content-Type": "application/json", **sent.pop(0)}.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Front)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = Client(f"http://127.0.0.1:{server.server_address[1]}", timeout=10)
        first, second = client.generate_result("rain"), client.generate_result("rain")
    finally:
        server.shutdown()
        server.server_close()
    assert (first.retries, first.seed, first.sample_rate) == (2, 7, 32000) and second.retries == 0
