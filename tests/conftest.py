"""Shared test fixtures: the reference release in ../shared/fixtures (used by path, never copied)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

# Kernels are tested on CPU tensors through Triton's interpreter; triton reads this once, at its first import.
os.environ.setdefault("TRITON_INTERPRET", "1")

# The reference release (shared/fixtures, beside the checkout as CI lays it out), or the folder MAGNET_FIXTURES names.
FIXTURES_ENV = "MAGNET_FIXTURES"
FIXTURES = Path(os.environ.get(FIXTURES_ENV) or Path(__file__).resolve().parents[2] / "shared" / "fixtures")
FIXTURE = FIXTURES / "magnet-tiny"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Most tests compare against the reference fixture: without it, one line saying where it goes, not 300 errors."""
    if not FIXTURE.is_dir():
        pytest.exit(f"the reference fixture is missing: no {FIXTURE}. Put the shared fixtures at ../shared/fixtures "
                    f"beside the checkout, or set {FIXTURES_ENV}=DIR (the folder holding magnet-tiny/)", returncode=4)


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURE


@pytest.fixture(scope="session")
def expected(fixture_dir: Path) -> dict[str, np.ndarray]:
    return dict(np.load(fixture_dir / "expected_magnet.npz"))


@pytest.fixture(scope="session")
def settings(fixture_dir: Path) -> dict:
    return json.loads((fixture_dir / "expected.json").read_text())


@pytest.fixture(scope="session")
def tiny(fixture_dir: Path):
    import magnet_engine as me

    return me.load(fixture_dir, device="cpu", deterministic=True)  # the scheduler's solo-equality tests need it


def run_settings(settings: dict, run: str) -> dict:
    """The fixture's settings of one `gen_*` run as GenerationConfig keywords."""
    g = {**settings["generate_defaults"], **settings["runs"][run]}
    return dict(steps=tuple(g["decoding_steps"]), greedy=not g["use_sampling"], temperature=g["temp"],
                anneal_temp=g["anneal_temp"], top_k=g["top_k"], top_p=g["top_p"],
                cfg=(g["max_cfg_coef"], g["min_cfg_coef"]), span_arrangement=g["span_arrangement"],
                span_scoring=g["span_scoring"], duration=settings["frames"] / settings["frame_rate"])
