"""EnCodec port vs audiocraft 1.3.0 reference outputs on the tiny fixture codec, plus loading/validation errors."""
from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import FIXTURE
from magnet_engine.engine import codec as codec_module
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


# ------------------------------------------------------------------------------------ the CPU inference path

DEFAULT_ASSETS = Path(codec_module.__file__).resolve().parent / "assets" / "magnet-default"


def _default_codec() -> Encodec:
    from safetensors.torch import load_file

    cfg = json.loads((DEFAULT_ASSETS / "config.json").read_text())["codec"]
    model = Encodec(CodecConfig.from_dict(cfg))
    model.load_state_dict(load_file(DEFAULT_ASSETS / "codec.safetensors"), strict=True)
    return model.eval()


@pytest.fixture(scope="module", params=["default-constant", "default-reflect", "fixture-constant", "fixture-reflect"])
def any_codec(request: pytest.FixtureRequest, codec: Encodec) -> Encodec:
    """The shipped default codec (16 kHz, ratios 8,5,4,2, no LSTM) and the fixture's (32 kHz, ratios 8,5,4,4, LSTM,
    weight norm), each with its own padding and with reflect padding (audiocraft checkpoints', e.g. magnet-small)."""
    which, pad = request.param.split("-")
    base = _default_codec() if which == "default" else codec
    model = Encodec(dataclasses.replace(base.config, pad_mode=pad))
    model.load_state_dict(base.state_dict(), strict=True)
    return model.eval()


def _three_ways(module: torch.nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fast path, plain modules, plain modules in float64) outputs of `module` on x, all in float64."""
    with torch.no_grad():
        assert codec_module._fast(x)  # fp32 on CPU without autograd: the path under test is taken
        fast = module(x).double()
        with monkeypatch.context() as m:
            m.setattr(codec_module, "_fast", lambda t: False)
            plain = module(x).double()
        exact = copy.deepcopy(module).double()(x.double())  # float64 never takes the fast path
    return fast, plain, exact


def _assert_within_fp32_rounding(fast: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor) -> None:
    """The fast path's error against the float64 computation of the same modules is at most a small multiple of
    the plain fp32 modules' own error (floored at one fp32 ulp of the output's scale): different summation orders
    and a 1-ulp exp are fine, a wrong tap, pad or trim (errors at the signal's scale) is not."""
    assert fast.shape == plain.shape == exact.shape
    eps = torch.finfo(torch.float32).eps
    floor = eps * exact.abs().max().item()
    err_plain = (plain - exact).abs().max().item()
    err_fast = (fast - exact).abs().max().item()
    assert err_fast <= 4 * max(err_plain, floor), (err_fast, err_plain, floor)


@pytest.mark.parametrize("frames, batch", [(1, 1), (1, 3), (7, 1), (7, 3), (498, 1), (500, 1), (500, 3)])
def test_fast_decoder_matches_plain_modules(any_codec: Encodec, frames: int, batch: int,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(frames * 10 + batch)
    codes = torch.randint(0, any_codec.config.bins, (batch, any_codec.config.n_q, frames), generator=g)
    z = any_codec.quantizer.decode(codes)  # [B, D, T], as decode feeds the decoder
    fast, plain, exact = _three_ways(any_codec.decoder, z, monkeypatch)
    assert fast.shape == (batch, 1, frames * any_codec.hop_length)
    _assert_within_fp32_rounding(fast, plain, exact)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("samples", [1, 7, 641, 6400])
def test_fast_encoder_matches_plain_modules(any_codec: Encodec, samples: int, batch: int,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # the encoder's strided convs pad unevenly (extra right padding): the F.pad-the-excess branch
    wav = 0.1 * torch.randn(batch, 1, samples, generator=torch.Generator().manual_seed(samples))
    fast, plain, exact = _three_ways(any_codec.encoder, wav, monkeypatch)
    _assert_within_fp32_rounding(fast, plain, exact)


def test_fast_path_is_taken_and_left_for_autograd(codec: Encodec) -> None:
    z = codec.quantizer.decode(torch.zeros(2, codec.config.n_q, 5, dtype=torch.long))  # [2, D, 5]
    first = codec.decoder.model[0]
    with torch.no_grad():
        assert first(z).stride(1) == 1  # channels-last: oneDNN's kernels ran
        assert not codec_module._fast(z.double()) and not codec_module._fast(z.bfloat16())
    y = first(z.requires_grad_())  # training (train/codec.py) keeps the plain modules' graph
    assert y.is_contiguous() and y.requires_grad


@pytest.mark.parametrize("k, r", [(4, 2), (10, 5), (16, 8), (3, 2), (5, 2)])
def test_transposed_conv_fast_path_matches_plain(k: int, r: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # kernel a multiple of the stride: the polyphase conv (SEANet's k = 2r); otherwise oneDNN's transposed conv
    torch.manual_seed(k * 10 + r)
    m = codec_module.PaddedConvTranspose1d(6, 5, k, r).eval()
    for batch, frames in [(1, 1), (1, 7), (3, 11)]:
        x = torch.randn(batch, 6, frames)
        fast, plain, exact = _three_ways(m, x, monkeypatch)
        assert fast.shape == (batch, 5, frames * r)
        _assert_within_fp32_rounding(fast, plain, exact)


def test_fast_path_follows_weight_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path's reordered weights are made again when a weight changes in place (load_state_dict, an
    in-place op) or is swapped (`.data`), never served stale."""
    torch.manual_seed(0)
    conv, convtr = codec_module.PaddedConv1d(4, 3, 3).eval(), codec_module.PaddedConvTranspose1d(4, 3, 4, 2).eval()
    x = torch.randn(2, 4, 9)

    def check() -> None:
        for m in (conv, convtr):
            fast, plain, exact = _three_ways(m, x, monkeypatch)
            _assert_within_fp32_rounding(fast, plain, exact)

    check()  # the reordered weights are made here
    with torch.no_grad():
        conv.conv.weight.mul_(-2)
        convtr.convtr.weight.add_(1)
    check()
    conv.load_state_dict({k: torch.randn_like(v) for k, v in conv.state_dict().items()})
    convtr.load_state_dict({k: torch.randn_like(v) for k, v in convtr.state_dict().items()})
    check()
    conv.conv.weight.data = torch.randn_like(conv.conv.weight)
    convtr.convtr.weight.data = torch.randn_like(convtr.convtr.weight)
    check()


@pytest.mark.parametrize("batch, frames", [(2, 1), (3, 7), (5, 50)])
def test_decode_rows_gives_each_row_alone(any_codec: Encodec, batch: int, frames: int) -> None:
    g = torch.Generator().manual_seed(batch * 100 + frames)
    codes = torch.randint(0, any_codec.config.bins, (batch, any_codec.config.n_q, frames), generator=g)
    alone = [any_codec.decode(codes[i:i + 1]) for i in range(batch)]
    exact = any_codec.decoder._row_exact
    for _ in range(3):  # the shape unseen (row by row), probed, known
        got = any_codec.decode_rows(codes)
        assert got.shape == (batch, 1, frames * any_codec.hop_length)
        for i in range(batch):
            assert torch.equal(got[i:i + 1], alone[i]), i
    mine = [k for k in exact if k[1][0] == batch and k[1][2] >= frames]  # (layer, shape, threads)
    assert mine and all(exact[k] is not None for k in mine)  # every layer probed by the second call
    elu = [i for i, m in enumerate(any_codec.decoder.model) if isinstance(m, codec_module.ELU)]
    assert all(exact[k] for k in mine if k[0] in elu)  # elementwise: batched


class _RowSkew(torch.nn.Module):
    """A layer whose batched call rounds rows unlike each row alone (as a batch-variant kernel would)."""

    def __init__(self) -> None:
        super().__init__()
        self.batched_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            self.batched_calls += 1
            return x + 1e-6 * x
        return x.clone()


def test_decode_rows_runs_a_row_variant_layer_row_by_row(codec: Encodec) -> None:
    model = Encodec(codec.config)
    model.load_state_dict(codec.state_dict())
    skew = _RowSkew()
    model.decoder.model.insert(1, skew)
    codes = torch.randint(0, codec.config.bins, (3, codec.config.n_q, 6), generator=torch.Generator().manual_seed(5))
    for _ in range(3):
        got = model.decode_rows(codes)
        for i in range(3):
            assert torch.equal(got[i:i + 1], model.decode(codes[i:i + 1])), i
    # unprobed at first sight, probed once at the second: the verdict is kept per (layer, shape, threads)
    assert skew.batched_calls == 1
    assert [v for k, v in model.decoder._row_exact.items() if k[0] == 1] == [False]
    assert not torch.equal(model.decode(codes), got)  # the plain batched decode does take the skew


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.1])
def test_elu_exp_within_one_ulp(alpha: float) -> None:
    # positive values pass through exactly; the exponential branch is exp's rounding plus exp - 1's cancellation,
    # at most ~1 ulp(1) in absolute terms, however small the input
    x = torch.cat([torch.linspace(-20, 20, 100_001), torch.tensor([0.0, -0.0, -1e-30, -1e-8, 1e-8, 80.0, -80.0]),
                   -torch.logspace(-12, 0, 1000)])
    y = codec_module._elu_exp(x, alpha)
    ref = torch.nn.functional.elu(x.double(), alpha)
    assert torch.equal(y[x > 0], x[x > 0])
    assert (y.double() - ref).abs().max().item() <= torch.finfo(torch.float32).eps
    assert codec_module.ELU(alpha)(x.clone().requires_grad_()).grad_fn is not None  # autograd: F.elu
