"""The service's OpenAPI document tells the truth: Schemathesis (all its default checks, in its examples, coverage,
fuzzing and stateful phases, as `schemathesis run` does) against the replica's FastAPI app in this process (no Ray,
no sockets), without and with an API key; a fixed seed and few examples keep it to seconds."""
from __future__ import annotations

import numbers
from collections import Counter
from pathlib import Path

import pytest

KEY = "s3cret-key"
# Valid requests may be long (an hour of audio, a million steps): valid durations and step counts are shrunk to tiny
# ones, which keeps a valid case valid and an invalid one invalid (only in-range values are touched).
TINY_DURATION = 2.5  # past the fixture's 1 s segment: long pieces (window by window) are exercised too
TINY_STEPS = 2


def _tiny(case) -> object:
    body = case.body
    if isinstance(body, dict):
        d = body.get("duration")
        if isinstance(d, numbers.Real) and not isinstance(d, bool) and 0 < d <= 3600:
            body["duration"] = min(d, TINY_DURATION)
        steps = body.get("steps")
        if isinstance(steps, list):
            body["steps"] = [min(s, TINY_STEPS) if isinstance(s, numbers.Real) and not isinstance(s, bool)
                             and s >= 1 else s for s in steps]
    return case


@pytest.fixture(scope="module", params=[None, KEY], ids=["no-key", "key"])
def served(request, fixture_dir: Path):
    from magnet_engine.serve.config import ServiceConfig, key_digest
    from magnet_engine.serve.http import Service, build_app

    key = request.param
    service = Service(ServiceConfig(model=str(fixture_dir), device="cpu",
                                    api_key_sha256=None if key is None else key_digest(key)))
    try:
        yield key, build_app(service)
    finally:
        service.close()


def test_schemathesis_finds_nothing(served):
    """Every default check of Schemathesis passes on every operation; 503 and 504 (a full queue, a request's own
    deadline) are documented answers, not faults, so `not_a_server_error` takes them."""
    import schemathesis
    from schemathesis.config import SchemathesisConfig
    from schemathesis.engine import Status, events

    key, app = served
    config = {"seed": 20261207, "generation": {"max-examples": 12}, "request-timeout": 60,
              "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503", "504"]}}}
    if key is not None:
        config["headers"] = {"Authorization": f"Bearer {key}"}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=SchemathesisConfig.from_dict(config))
    schema.hook("map_case")(lambda ctx, case: _tiny(case))
    problems: list[str] = []
    statuses: dict[str, Counter] = {}
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, (events.NonFatalError, events.FatalError)):
            problems.append(f"{type(event).__name__}: {getattr(event, 'label', '')} {event.value!r}"
                            if hasattr(event, "value") else repr(event))
        elif isinstance(event, events.ScenarioFinished):
            rec = event.recorder
            for checks in rec.checks.values():
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        f = check.failure_info
                        problems.append(f"{event.phase} {rec.label} {check.name}: {f.failure.title}: "
                                        f"{f.failure.message} -- {f.code_sample}")
            for interaction in rec.interactions.values():
                if interaction.response is not None:
                    statuses.setdefault(rec.label, Counter())[interaction.response.status_code] += 1
    assert not problems, "\n".join(problems)
    generate = statuses["POST /v1/generate"]
    assert generate[200] and generate[422] and generate[400], statuses  # audio made, bodies refused
    assert bool(generate[401]) == (key is not None) and statuses["GET /v1/model"][200], statuses


def test_the_document_states_auth_and_statuses_as_configured(served):
    """A security scheme and 401 answers only with a key; every operation lists what it can answer, with the
    headers and JSON bodies it sends; the request schema carries the engine's rules for the served model."""
    key, app = served
    doc = app.openapi()
    ops = {(path, method): op for path, item in doc["paths"].items() for method, op in item.items()}
    auth = key is not None
    assert ("securitySchemes" in doc.get("components", {})) == auth
    assert {op.get("security") is not None for path, op in ops.items() if path[0] != "/v1/health"} == {auth}
    generate = ops[("/v1/generate", "post")]
    want = {"200", "400", "413", "422", "500", "503", "504"} | ({"401"} if auth else set())
    assert set(generate["responses"]) == want
    assert generate["responses"]["503"]["headers"]["Retry-After"]["required"]
    assert "request_id" in generate["responses"]["500"]["content"]["application/json"]["schema"]["required"]
    assert set(generate["responses"]["200"]["content"]) == {"audio/wav", "audio/flac", "audio/ogg",
                                                            "application/json"}
    assert set(ops[("/v1/model", "get")]["responses"]) == {"200", "500"} | ({"401"} if auth else set())
    assert set(ops[("/v1/health", "get")]["responses"]) == {"200", "503", "500"}
    body = generate["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert body["steps"]["minItems"] == body["steps"]["maxItems"] == 4  # the fixture's codebooks
    assert body["steps"]["items"] == {"type": "integer", "minimum": 1}
    assert body["top_k"]["maximum"] == 2048 and body["cfg"]["maxItems"] == 2
    assert body["prompt"]["anyOf"][1] == {"type": "null"} and body["prompt"]["anyOf"][0]["pattern"] == r"\S"
    assert body["duration"]["anyOf"][0]["minimum"] == 3 / 50  # one span of the 50 Hz fixture
    assert "rescore_weight" not in body and body["hybrid_prefix"]["maximum"] == 0  # no AR model over HTTP
