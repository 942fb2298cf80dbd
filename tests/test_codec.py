"""EnCodec port vs audiocraft 1.3.0 reference outputs on the tiny fixture codec, plus loading/validation errors."""
from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import FIXTURE
from magnet_engine.engine.codec import CodecConfig, Encodec, load_codec

CODEC_PATH = FIXTURE / "compression_state_dict.bin"  # conftest stops the run when the fixture is missing


@pytest.fixture(scope="module")
def package() -> dict:
    return torch.load(CODEC_PATH, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def xp_cfg(package: dict) -> dict:
    return yaml.safe_load(package["xp.cfg"])


@pytest.fixture(scope="module")
def codec() -> Encodec:
    return load_codec(CODEC_PATH)


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "expected_magnet.npz") as f:
        return {k: f[k] for k in ("gen_nonoverlap_max", "decoded_wav", "encode_wav", "encode_codes")}


# ------------------------------------------------------------------------------------------ reference outputs


def test_decode_matches_reference(codec: Encodec, expected: dict) -> None:
    codes = torch.from_numpy(expected["gen_nonoverlap_max"])  # [2, 4, 48]
    wav = codec.decode(codes)
    ref = torch.from_numpy(expected["decoded_wav"])  # [2, 1, 30720]
    assert wav.shape == ref.shape == (codes.shape[0], 1, codes.shape[-1] * codec.hop_length)
    assert wav.dtype == torch.float32
    assert (wav - ref).abs().max().item() < 1e-4


def test_encode_matches_reference(codec: Encodec, expected: dict) -> None:
    codes = codec.encode(torch.from_numpy(expected["encode_wav"]))  # [1, 1, 6400] -> [1, 4, 10]
    assert codes.dtype == torch.int64
    assert torch.equal(codes, torch.from_numpy(expected["encode_codes"]))


def test_decode_batch_consistent(codec: Encodec, expected: dict) -> None:
    codes = torch.from_numpy(expected["gen_nonoverlap_max"])[:, :, :12]
    both = codec.decode(codes)
    for b in range(codes.shape[0]):
        torch.testing.assert_close(both[b: b + 1], codec.decode(codes[b: b + 1]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("frames", [1, 3])
def test_decode_length_is_frames_times_hop(codec: Encodec, frames: int) -> None:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, codec.config.bins, (1, codec.config.n_q, frames), generator=g)
    assert codec.decode(codes).shape == (1, 1, frames * codec.hop_length)
    assert codec.decode(codes.int()).shape == (1, 1, frames * codec.hop_length)  # any integer dtype


@pytest.mark.parametrize("samples", [1, 639, 640, 1000, 6400])
def test_encode_length_is_ceil(codec: Encodec, samples: int) -> None:
    wav = torch.randn(2, 1, samples, generator=torch.Generator().manual_seed(1)) * 0.1
    codes = codec.encode(wav)
    assert codes.shape == (2, codec.config.n_q, -(-samples // codec.hop_length))
    assert int(codes.min()) >= 0 and int(codes.max()) < codec.config.bins


# --------------------------------------------------------------------------------------------- bad codes / wav


def test_decode_rejects_float_codes(codec: Encodec) -> None:
    with pytest.raises(TypeError, match="integer codes"):
        codec.decode(torch.zeros(1, codec.config.n_q, 2))


def test_decode_rejects_non_tensor(codec: Encodec) -> None:
    with pytest.raises(TypeError, match="torch.as_tensor"):
        codec.decode(np.zeros((1, codec.config.n_q, 2), dtype=np.int64))  # type: ignore[arg-type]


@pytest.mark.parametrize("value, match", [(2048, "mask token"), (5000, r"\[0, 2048\)"), (-1, "found -1")])
def test_decode_rejects_out_of_range(codec: Encodec, value: int, match: str) -> None:
    codes = torch.zeros(1, codec.config.n_q, 3, dtype=torch.long)
    codes[0, 1, 2] = value
    with pytest.raises(ValueError, match=match):
        codec.decode(codes)


@pytest.mark.parametrize("shape", [(1, 3, 5), (1, 5, 5), (4, 5), (1, 4, 0)])
def test_decode_rejects_bad_shape(codec: Encodec, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"codes \[B, 4, T>0\]"):
        codec.decode(torch.zeros(shape, dtype=torch.long))


def test_encode_rejects_bad_input(codec: Encodec) -> None:
    with pytest.raises(TypeError, match=r"encode expects a floating-point torch.Tensor \[B, 1, samples\]"):
        codec.encode(torch.zeros(1, 1, 640, dtype=torch.long))
    with pytest.raises(ValueError, match="downmix"):
        codec.encode(torch.zeros(1, 2, 640))
    with pytest.raises(ValueError, match=r"encode expects wav \[B, 1, samples>0\], got \(640,\); add batch/channel"):
        codec.encode(torch.zeros(640))


# ------------------------------------------------------------------------------------------------- bad files


def test_truncated_file(tmp_path: Path) -> None:
    data = CODEC_PATH.read_bytes()
    bad = tmp_path / "truncated.bin"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is truncated or not a torch checkpoint"):
        load_codec(bad)


@pytest.mark.parametrize("payload", [b"", b"definitely not a checkpoint" * 8, b"\x80\x02}q\x00."])
def test_garbage_file(tmp_path: Path, payload: bytes) -> None:
    bad = tmp_path / "garbage.bin"
    bad.write_bytes(payload)
    with pytest.raises(ValueError, match="is truncated or not a torch checkpoint"):
        load_codec(bad)


def test_file_without_package(tmp_path: Path) -> None:
    odd = tmp_path / "list.bin"
    torch.save([torch.zeros(2)], odd)
    with pytest.raises(ValueError, match="not a codec package dict"):
        load_codec(odd)
    empty_cfg = tmp_path / "empty_cfg.bin"
    torch.save({"best_state": {}, "xp.cfg": ""}, empty_cfg)
    with pytest.raises(ValueError, match="no `encodec` section"):
        load_codec(empty_cfg)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_codec(tmp_path / "nope.bin")


class _RunsCode:
    """Pickles as a call to os.system: what a malicious checkpoint looks like."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_refuses_code_in_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    torch.save({"best_state": {}, "xp.cfg": "", "payload": _RunsCode(marker)}, evil)
    with pytest.raises(ValueError, match="could run code; refusing"):
        load_codec(evil)
    assert not marker.exists()


def test_refuses_code_in_legacy_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"x": _RunsCode(marker)}, buf, _use_new_zipfile_serialization=False)
    evil = tmp_path / "evil_legacy.bin"
    evil.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="could run code; refusing"):
        load_codec(evil)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ packages / config


def test_config_from_fixture_yaml(xp_cfg: dict) -> None:
    cfg = CodecConfig.from_xp_cfg(xp_cfg)
    seanet, rvq = xp_cfg["seanet"], xp_cfg["rvq"]
    assert cfg.sample_rate == xp_cfg["sample_rate"] and cfg.channels == xp_cfg["channels"] == 1
    assert cfg.ratios == tuple(seanet["ratios"]) and cfg.dimension == seanet["dimension"]
    assert cfg.n_filters == seanet["n_filters"] and cfg.lstm_layers == seanet["lstm"]
    assert (cfg.n_q, cfg.bins) == (rvq["n_q"], rvq["bins"])
    assert (cfg.norm, cfg.pad_mode, cfg.true_skip) == ("weight_norm", "constant", True)
    assert cfg.hop_length == 640 and cfg.frame_rate == 50
    assert CodecConfig(**dataclasses.asdict(cfg)) == cfg  # round-trip through plain fields
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_q = 8  # type: ignore[misc]


@pytest.mark.parametrize(
    "section, key, value, match",
    [
        ("encodec", "causal", True, "causal"),
        ("seanet", "norm", "time_group_norm", "norm="),
        ("encodec", "renormalize", True, "renormalize"),
        (None, "channels", 2, "channels=2"),
        ("seanet", "activation", "GELU", "ELU"),
        ("seanet", "pad_mode", "replicate", "pad_mode"),
        ("encodec", "quantizer", "no_quant", "rvq"),
        ("encodec", "sample_rate", "${oc.env:SR}", "interpolation"),
    ],
)
def test_config_rejects_unsupported(xp_cfg: dict, section: str | None, key: str, value: object, match: str) -> None:
    cfg = yaml.safe_load(yaml.safe_dump(xp_cfg))  # deep copy
    (cfg[section] if section else cfg)[key] = value
    with pytest.raises(ValueError, match=match):
        CodecConfig.from_xp_cfg(cfg)


def test_config_rejects_decoder_trim_and_asymmetry(xp_cfg: dict) -> None:
    cfg = yaml.safe_load(yaml.safe_dump(xp_cfg))
    cfg["seanet"]["decoder"]["trim_right_ratio"] = 0.5
    with pytest.raises(ValueError, match="trim_right_ratio"):
        CodecConfig.from_xp_cfg(cfg)
    cfg = yaml.safe_load(yaml.safe_dump(xp_cfg))
    cfg["seanet"]["encoder"]["n_filters"] = 8
    with pytest.raises(ValueError, match="one side only"):
        CodecConfig.from_xp_cfg(cfg)


def test_from_package_strict_keys(package: dict) -> None:
    state = dict(package["best_state"])
    dropped = "decoder.model.3.convtr.convtr.weight_g"
    del state[dropped]
    state["decoder.model.99.conv.conv.bias"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \['decoder\.model\.3\.convtr\.convtr\.weight_g'\].*model\.99"):
        Encodec.from_package({**package, "best_state": state})


def test_from_package_shape_mismatch(package: dict, xp_cfg: dict) -> None:
    cfg = yaml.safe_load(yaml.safe_dump(xp_cfg))
    cfg["seanet"]["dimension"] = 32
    with pytest.raises(ValueError, match="shapes do not match"):
        Encodec.from_package({**package, "xp.cfg": yaml.safe_dump(cfg)})


def test_from_package_accepts_dict_cfg_and_parametrized_keys(package: dict, xp_cfg: dict, codec: Encodec) -> None:
    # Newer torch names weight-norm tensors parametrizations.weight.original{0,1}; both spellings load the same.
    state = {k.replace(".weight_g", ".parametrizations.weight.original0")
              .replace(".weight_v", ".parametrizations.weight.original1"): v
             for k, v in package["best_state"].items()}
    other = Encodec.from_package({"best_state": state, "xp.cfg": xp_cfg})
    for (k, a), b in zip(codec.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k


def test_from_package_rejects_pointer_package() -> None:
    with pytest.raises(ValueError, match="transformers-format"):
        Encodec.from_package({"pretrained": "facebook/encodec_32khz", "exported": True, "version": "1.3.0"})
    with pytest.raises(ValueError, match="lacks"):
        Encodec.from_package({"best_state": {}})
