"""The benchmark row: one JSON object per line, its required keys and types written once here, and a validator.

Every producer (`bench.e2e`, the HF peer) builds rows that `validate_row` accepts; `bench.report` reads them back.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

Num = (int, float)
OptStr = (str, type(None))
OptNum = (int, float, type(None))

# key -> type (or tuple of types), or a nested dict for an object whose keys are all required.
ROW_SCHEMA: dict[str, Any] = {
    "schema": int,
    "scenario": str,  # e.g. "e2e/magnet-small-10secs/torch/cpu/float32/b1/2s"
    "model": str,  # preset name or checkpoint path
    "kind": str,  # magnet | ar | hf-musicgen
    "backend": str,  # torch | triton | onnx | hf
    "device": str,
    "dtype": str,
    "batch": int,
    "duration_s": Num,  # requested seconds of audio per sample
    "audio_s": Num,  # seconds actually produced per sample (MAGNeT trims T to a multiple of the span)
    "frames": int,
    "steps": list,  # MAGNeT: decoding steps per codebook stage; AR: [frames + max delay] one-frame steps
    "passes": int,  # LM forward passes per request
    "repeats": int,
    "warmup": int,
    "latency_s": {"median": Num, "p20": Num, "p80": Num, "min": Num, "max": Num},
    "warmup_s": list,  # seconds of each warm-up run, excluded from latency_s
    "stages_s": {"text": Num, "lm": Num, "codec": Num},  # medians over repeats
    "cpu_s": Num,  # median process CPU seconds per request (all threads): robust to other load on the machine
    "audio_s_per_s": Num,  # batch · audio_s / median latency
    "samples_per_s": Num,  # batch / median latency
    "peak_mem_mb": Num,
    "params_m": OptNum,  # LM parameters, millions
    "weights": str,  # random | checkpoint
    "text_encoder": str,
    "git_sha": str,
    "timestamp": str,
    "versions": {"torch": str, "triton": OptStr, "onnxruntime": OptStr, "transformers": OptStr},
    "host": {"cpu": str, "cores": int, "gpu": OptStr},
    "notes": str,
}


def _check(value: Any, spec: Any, path: str, errors: list[str]) -> None:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected an object, got {type(value).__name__}")
            return
        for key, sub in spec.items():
            if key not in value:
                errors.append(f"{path}.{key}: missing")
            else:
                _check(value[key], sub, f"{path}.{key}", errors)
        return
    types = spec if isinstance(spec, tuple) else (spec,)
    # bool is an int subclass in Python; a flag where a number belongs is a bug
    if isinstance(value, bool) and bool not in types:
        errors.append(f"{path}: expected {'/'.join(t.__name__ for t in types)}, got bool")
    elif not isinstance(value, types):
        errors.append(f"{path}: expected {'/'.join(t.__name__ for t in types)}, got {type(value).__name__}")


def row_errors(row: Any) -> list[str]:
    """Every way `row` departs from ROW_SCHEMA (empty = valid). Extra keys are allowed."""
    errors: list[str] = []
    _check(row, ROW_SCHEMA, "row", errors)
    if not errors:
        lat = row["latency_s"]
        if not lat["p20"] <= lat["median"] <= lat["p80"]:
            errors.append("row.latency_s: expected p20 <= median <= p80")
        if row["batch"] < 1 or row["repeats"] < 1:
            errors.append("row: batch and repeats must be >= 1")
    return errors


def validate_row(row: Any) -> dict[str, Any]:
    """Raise ValueError naming every problem, else return the row."""
    errors = row_errors(row)
    if errors:
        raise ValueError("invalid benchmark row: " + "; ".join(errors))
    return row


def json_line(row: dict[str, Any]) -> str:
    return json.dumps(row)


def append_rows(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Validate, then append one JSON object per line."""
    rows = [validate_row(r) for r in rows]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for r in rows:
            f.write(json_line(r) + "\n")


def read_rows(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """JSON lines from each file (blank lines skipped); each row validated, errors name file:line."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such results file: {path}")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
            errors = row_errors(row)
            if errors:
                raise ValueError(f"{path}:{n}: " + "; ".join(errors))
            rows.append(row)
    return rows


def emit(rows: Iterable[dict[str, Any]], path: str | Path | None) -> None:
    """Print each row as a JSON line (flushed: a long run shows its rows as they come) and append it to `path` too
    when one is given. For the benchmarks whose rows are their own (not ROW_SCHEMA's)."""
    for row in rows:
        line = json.dumps(row)
        print(line, flush=True)
        if path:
            with open(path, "a") as f:
                f.write(line + "\n")
