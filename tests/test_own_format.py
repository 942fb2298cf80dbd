"""Our own model format (config.json + safetensors, no pickle) round-trips the released format exactly."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_settings
from magnet_engine.engine.loading import save_pretrained

import magnet_engine as me


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("own")
    save_pretrained(folder, tiny.lm, tiny.codec, generation={"steps": [4, 2, 2, 2], "greedy": True})
    return folder


def test_round_trip_token_exact(saved, fixture_dir, settings, expected):
    eng = me.load(saved, text_encoder=fixture_dir / "t5", device="cpu")
    kw = run_settings(settings, "gen_stride1")
    np.testing.assert_array_equal(eng.generate(settings["prompts"], **kw).codes.numpy(), expected["gen_stride1"])
    assert eng.default_generation().steps == (4, 2, 2, 2) and eng.default_generation().greedy


def test_no_pickle_in_own_format(saved):
    assert sorted(p.name for p in saved.iterdir()) == ["codec.safetensors", "config.json", "lm.safetensors"]


def test_damaged_own_format(saved, tmp_path, fixture_dir):
    for name in ("config.json", "lm.safetensors", "codec.safetensors"):
        (tmp_path / name).write_bytes((saved / name).read_bytes())
    (tmp_path / "lm.safetensors").write_bytes((saved / "lm.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated"):
        me.load(tmp_path, text_encoder=fixture_dir / "t5", device="cpu")
    cfg = json.loads((saved / "config.json").read_text())
    cfg["version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="v1 config"):
        me.load(tmp_path, text_encoder=fixture_dir / "t5", device="cpu")


def test_hub_id_resolves_offline_from_the_cache(tmp_path, monkeypatch, fixture_dir, settings, expected):
    """`org/name` ids go through the Hugging Face cache first: a cached repo loads with no network at all."""
    import shutil

    import huggingface_hub.constants as hf_constants

    repo = tmp_path / "hub" / "models--facebook--magnet-tiny"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for name in ("state_dict.bin", "compression_state_dict.bin"):
        shutil.copy(fixture_dir / name, snap / name)
    shutil.copytree(fixture_dir / "t5", snap / "t5")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # read at import: patch the constant, not the env
    eng = me.load("facebook/magnet-tiny", device="cpu")
    kw = run_settings(settings, "gen_nonoverlap_max")
    np.testing.assert_array_equal(eng.generate(settings["prompts"], **kw).codes.numpy(), expected["gen_nonoverlap_max"])
    with pytest.raises(ValueError, match="cannot fetch"):
        me.load("facebook/not-cached-here", device="cpu")


def test_generation_overrides_round_trip():
    """A model's `generation` section (config.json, ONNX manifest) is its defaults' difference from the reference's."""
    from magnet_engine.engine.config import GenerationConfig

    base = GenerationConfig()
    ours = GenerationConfig(steps=(1, 4, 4, 4), temperature=1.0, anneal_temp=False, cfg=(1.0,))
    section = ours.overrides(base)
    assert section == {"steps": [1, 4, 4, 4], "temperature": 1.0, "anneal_temp": False, "cfg": [1.0]}
    assert GenerationConfig.from_dict(json.loads(json.dumps(section)), base) == ours
    assert base.overrides(base) == {}
