"""A small client of `magnet serve` (standard library + soundfile): `Client(url).generate(prompt, **fields)`."""
from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import numpy as np


class ServiceError(RuntimeError):
    """An error answer: HTTP `status`, the server's message, the request `field` it names, and `retry_after`
    seconds for a 503."""

    def __init__(self, status: int, message: str, field: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.field, self.retry_after = status, message, field, retry_after


@dataclass(frozen=True)
class Result:
    """A generation as the service sent it in JSON: audio [samples] fp32, tokens [K][T], the seed that reproduces it."""

    audio: np.ndarray
    sample_rate: int
    tokens: list[list[int]]
    seed: int
    latency_s: float
    retries: int = 0  # X-Retries: times the service sent the request again after its model replica died


class Client:
    """`url`: the service's base URL (e.g. http://127.0.0.1:8000); `api_key`: sent as a bearer token."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.url, self.api_key, self.timeout = url.rstrip("/"), api_key, timeout

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
              accept: str = "*/*") -> tuple[bytes, dict[str, str]]:
        headers = {"Accept": accept}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key is not None:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read(), dict(resp.headers.items())
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                err = json.loads(raw)
            except ValueError:
                err = {"error": raw.decode(errors="replace")}
            if not isinstance(err, dict):
                err = {"error": str(err)}
            retry = e.headers.get("Retry-After")
            raise ServiceError(e.code, str(err.get("error", err)), err.get("field"),
                               float(retry) if retry else None) from None

    def generate(self, prompt: str | None, **fields: Any) -> tuple[np.ndarray, int]:
        """Audio [samples] fp32 and its sample rate. `fields`: GenerationConfig fields (seed, duration, steps, ...),
        `format` (wav, flac) and `timeout` (seconds). Raises ServiceError for an error answer."""
        import soundfile as sf

        data, _ = self._call("POST", "/v1/generate", {"prompt": prompt, **fields})
        audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        return audio.mean(axis=1), int(sr)

    def generate_result(self, prompt: str | None, **fields: Any) -> Result:
        """As `generate`, with the tokens and the seed (the JSON answer)."""
        import soundfile as sf

        data, headers = self._call("POST", "/v1/generate", {"prompt": prompt, **fields}, accept="application/json")
        body = json.loads(data)
        audio, sr = sf.read(io.BytesIO(base64.b64decode(body["audio"])), dtype="float32", always_2d=True)
        retries = {k.lower(): v for k, v in headers.items()}.get("x-retries", "0")  # absent: an in-process front
        return Result(audio.mean(axis=1), int(sr), body["tokens"], int(body["seed"]), float(body["latency_s"]),
                      int(retries))

    def health(self) -> dict[str, Any]:
        return json.loads(self._call("GET", "/v1/health")[0])

    def model(self) -> dict[str, Any]:
        return json.loads(self._call("GET", "/v1/model")[0])
