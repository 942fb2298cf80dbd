"""Shared test fixtures: the reference release in ../shared/fixtures (used by path, never copied)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

# Kernels are tested on CPU tensors through Triton's interpreter; triton reads this once, at its first import.
os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "magnet-tiny"


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    assert FIXTURE.is_dir(), f"reference fixture missing at {FIXTURE}"
    return FIXTURE


@pytest.fixture(scope="session")
def expected(fixture_dir: Path) -> dict[str, np.ndarray]:
    return dict(np.load(fixture_dir / "expected_magnet.npz"))


@pytest.fixture(scope="session")
def settings(fixture_dir: Path) -> dict:
    return json.loads((fixture_dir / "expected.json").read_text())


@pytest.fixture(scope="session")
def tiny(fixture_dir: Path):
    import engine

    return engine.load(fixture_dir, device="cpu")


def run_settings(settings: dict, run: str) -> dict:
    """The fixture's settings of one `gen_*` run as GenerationConfig keywords."""
    g = {**settings["generate_defaults"], **settings["runs"][run]}
    return dict(steps=tuple(g["decoding_steps"]), greedy=not g["use_sampling"], temperature=g["temp"],
                anneal_temp=g["anneal_temp"], top_k=g["top_k"], top_p=g["top_p"],
                cfg=(g["max_cfg_coef"], g["min_cfg_coef"]), span_arrangement=g["span_arrangement"],
                span_scoring=g["span_scoring"], duration=settings["frames"] / settings["frame_rate"])
