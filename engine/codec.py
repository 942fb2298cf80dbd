"""EnCodec (audiocraft format) in plain PyTorch: SEANet encoder/decoder + residual VQ, loaded from a
`compression_state_dict.bin` package without audiocraft, torchaudio or the `encodec` package.

Shapes: B batch, K codebooks (n_q), T frames, S samples (S = T * hop), D latent dimension, C channels.

Numerics follow audiocraft 1.3.0 exactly where it matters for bit-compatibility:
- non-causal `StreamableConv1d` padding (split k_eff - stride, right = total // 2, plus extra right padding so the
  last window is full) and `StreamableConvTranspose1d` trimming (same split), so decode gives exactly T * hop samples;
- weight norm (old `torch.nn.utils.weight_norm`, dim 0) is folded into plain weights once at load time; it is a
  reparametrisation, so inference only needs `g * v / ||v||`;
- the RVQ picks codewords with audiocraft's `EuclideanCodebook` distance expression, in the same order, so that
  near-ties break the same way.

Inference on CPU (fp32, no autograd, not exporting) takes a faster path inside the same modules (`_fast`):
channels-last oneDNN convolutions called directly (every shape on one backend: PyTorch's dispatch sends small
single-row inputs to its slower native kernels), weights reordered once, transposed convolutions as polyphase
convolutions, zero padding inside the convolution, an exp2-based ELU. It equals the plain modules to fp32 rounding
(tests/test_codec.py bounds it against a float64 run); training and export use the plain modules.

`Encodec.decode_rows` decodes a batch whose every row is bit for bit that row decoded alone: what the scheduler
needs to batch requests' audio and keep each request's solo audio.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CodecConfig", "Encodec", "load_codec"]

_NORMS = ("weight_norm", "none")
_PAD_MODES = ("constant", "reflect")
_INTERP = re.compile(r"^\$\{([A-Za-z_][\w.]*)\}$")
# Decoder-only SEANet settings (`seanet.decoder.*`) and the only values we implement for them.
_DECODER_ONLY = {"trim_right_ratio": 1.0, "final_activation": None, "final_activation_params": None}
# RVQ training state kept in the package; not needed to encode/decode, so accepted but not required.
_VQ_TRAINING_BUFFERS = ("embed_avg", "cluster_size", "inited")
_LOG2E = 1.0 / math.log(2.0)


# ----------------------------------------------------------------------------------------------------- config


def _lookup(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"xp.cfg: interpolation ${{{dotted}}} points at a missing key; the config is incomplete")
        node = node[part]
    return node


def _resolve(cfg: dict[str, Any], value: Any, depth: int = 0) -> Any:
    """Resolve OmegaConf's plain `${a.b}` interpolations (all that the codec section uses) against the root."""
    if not isinstance(value, str) or "${" not in value:
        return value
    m = _INTERP.match(value)
    if m is None or depth > 16:
        raise ValueError(f"xp.cfg: unsupported interpolation {value!r}; replace it with a literal value")
    return _resolve(cfg, _lookup(cfg, m.group(1)), depth + 1)


def _section(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    sec = cfg.get(name)
    if isinstance(sec, dict):
        return sec
    raise ValueError(f"xp.cfg has no `{name}` section; is this an audiocraft EnCodec package?")


@dataclass(frozen=True)
class CodecConfig:
    """EnCodec hyperparameters (audiocraft `encodec.*`, `seanet.*`, `rvq.*`). Only the non-causal,
    non-renormalising mono model with ELU and weight_norm/no norm is supported (what the 32 kHz release uses)."""

    sample_rate: int
    channels: int
    dimension: int  # D: latent width = codeword width (the RVQ has no projection)
    n_filters: int
    ratios: tuple[int, ...]  # decoder order (upsampling); the encoder uses them reversed
    n_residual_layers: int
    kernel_size: int
    last_kernel_size: int
    residual_kernel_size: int
    dilation_base: int
    compress: int
    lstm_layers: int  # 0 = no LSTM
    n_q: int  # K
    bins: int  # codebook size
    activation_alpha: float = 1.0  # ELU alpha
    norm: str = "weight_norm"  # "weight_norm" | "none"
    pad_mode: str = "constant"  # "constant" | "reflect"
    true_skip: bool = True  # identity residual shortcut (else a k=1 conv)
    disable_norm_outer_blocks: int = 0

    def __post_init__(self) -> None:
        ints = {
            "sample_rate": self.sample_rate, "dimension": self.dimension, "n_filters": self.n_filters,
            "kernel_size": self.kernel_size, "last_kernel_size": self.last_kernel_size,
            "residual_kernel_size": self.residual_kernel_size, "dilation_base": self.dilation_base,
            "compress": self.compress, "n_q": self.n_q, "bins": self.bins,
        }
        for name, v in ints.items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"codec config: {name} must be a positive integer, got {v!r}")
        if not self.ratios or any(not isinstance(r, int) or r < 1 for r in self.ratios):
            raise ValueError(f"codec config: ratios must be a non-empty tuple of positive ints, got {self.ratios!r}")
        if self.channels != 1:
            raise ValueError(f"codec config: channels={self.channels}; only mono (channels=1) EnCodec is supported")
        if self.n_residual_layers < 0 or self.lstm_layers < 0:
            raise ValueError("codec config: n_residual_layers and lstm must be >= 0")
        if self.norm not in _NORMS:
            raise ValueError(f"codec config: norm={self.norm!r} is not supported; use one of {_NORMS}")
        if self.pad_mode not in _PAD_MODES:
            raise ValueError(f"codec config: pad_mode={self.pad_mode!r} is not supported; use one of {_PAD_MODES}")
        if not 0 <= self.disable_norm_outer_blocks <= len(self.ratios) + 2:
            raise ValueError(f"codec config: disable_norm_outer_blocks must be in [0, {len(self.ratios) + 2}]")

    @property
    def hop_length(self) -> int:
        """Samples per frame: the product of the ratios (640 for the 32 kHz model)."""
        return math.prod(self.ratios)

    @property
    def frame_rate(self) -> int:
        """Frames per second, `sample_rate // hop_length` as audiocraft computes it (50 for the 32 kHz model)."""
        return self.sample_rate // self.hop_length

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CodecConfig:
        """Inverse of `dataclasses.asdict` (our own format's config.json)."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - names:
            raise ValueError(f"codec config has unknown keys {sorted(set(d) - names) if isinstance(d, dict) else d}")
        return cls(**{**d, "ratios": tuple(d["ratios"])})

    @classmethod
    def from_xp_cfg(cls, cfg: dict[str, Any]) -> CodecConfig:
        """Read the codec settings from an audiocraft `xp.cfg` (the YAML string, already `yaml.safe_load`ed).

        Raises ValueError naming the setting for anything this engine does not implement."""
        if not isinstance(cfg, dict):
            raise TypeError(f"xp.cfg must be a mapping (yaml.safe_load of the string), got {type(cfg).__name__}")
        model = cfg.get("compression_model", "encodec")
        if model != "encodec":
            raise ValueError(f"xp.cfg: compression_model={model!r}; only 'encodec' packages are supported")
        enc = _section(cfg, "encodec")
        seanet = _section(cfg, "seanet")
        rvq = _section(cfg, "rvq")

        def get(sec: dict[str, Any], secname: str, key: str, default: Any = ...) -> Any:
            if key not in sec:
                if default is ...:
                    raise ValueError(f"xp.cfg: missing `{secname}.{key}`")
                return default
            return _resolve(cfg, sec[key])

        if get(enc, "encodec", "autoencoder", "seanet") != "seanet":
            raise ValueError("xp.cfg: encodec.autoencoder must be 'seanet'")
        if get(enc, "encodec", "quantizer", "rvq") != "rvq":
            raise ValueError("xp.cfg: encodec.quantizer must be 'rvq' (no_quant / other quantizers are unsupported)")
        if get(enc, "encodec", "causal", False) or get(seanet, "seanet", "causal", False):
            raise ValueError("xp.cfg: causal EnCodec is not supported (only the non-causal 32 kHz music codec); "
                             "set encodec.causal=false or use a non-causal checkpoint")
        if get(enc, "encodec", "renormalize", False) or get(enc, "encodec", "renorm", False):
            raise ValueError("xp.cfg: encodec.renormalize=true is not supported (decode would need per-item scales)")
        sample_rate = get(enc, "encodec", "sample_rate", None)
        sample_rate = _resolve(cfg, cfg.get("sample_rate")) if sample_rate is None else sample_rate
        channels = get(enc, "encodec", "channels", None)
        channels = _resolve(cfg, cfg.get("channels")) if channels is None else channels
        if get(seanet, "seanet", "channels", channels) != channels:
            raise ValueError("xp.cfg: seanet.channels differs from encodec.channels")
        activation = get(seanet, "seanet", "activation", "ELU")
        if activation != "ELU":
            raise ValueError(f"xp.cfg: seanet.activation={activation!r}; only ELU is supported")
        act_params = get(seanet, "seanet", "activation_params", None) or {}
        if set(act_params) - {"alpha"}:
            raise ValueError(f"xp.cfg: unsupported seanet.activation_params {sorted(act_params)}; only alpha")

        # `seanet.encoder` / `seanet.decoder` override the shared settings per side (builders.get_encodec_autoencoder).
        shared_keys = set(seanet) - {"encoder", "decoder"}
        for side in ("encoder", "decoder"):
            overrides = get(seanet, "seanet", side, None) or {}
            for key, val in overrides.items():
                val = _resolve(cfg, val)
                if side == "decoder" and key in _DECODER_ONLY:
                    if val != _DECODER_ONLY[key]:
                        raise ValueError(f"xp.cfg: seanet.decoder.{key}={val!r} is not supported "
                                         f"(expected {_DECODER_ONLY[key]!r} for a non-causal codec)")
                elif key not in shared_keys or _resolve(cfg, seanet[key]) != val:
                    raise ValueError(f"xp.cfg: seanet.{side}.{key}={val!r} overrides one side only; "
                                     "asymmetric encoder/decoder settings are not supported")

        dimension = int(get(seanet, "seanet", "dimension"))
        for key in ("input_dimension", "output_dimension"):
            if rvq.get(key) not in (None, dimension):
                raise ValueError(f"xp.cfg: rvq.{key} != seanet.dimension needs RVQ projections; not supported")
        return cls(
            sample_rate=int(sample_rate),
            channels=int(channels),
            dimension=dimension,
            n_filters=int(get(seanet, "seanet", "n_filters")),
            ratios=tuple(int(r) for r in get(seanet, "seanet", "ratios")),
            n_residual_layers=int(get(seanet, "seanet", "n_residual_layers")),
            kernel_size=int(get(seanet, "seanet", "kernel_size")),
            last_kernel_size=int(get(seanet, "seanet", "last_kernel_size")),
            residual_kernel_size=int(get(seanet, "seanet", "residual_kernel_size")),
            dilation_base=int(get(seanet, "seanet", "dilation_base")),
            compress=int(get(seanet, "seanet", "compress")),
            lstm_layers=int(get(seanet, "seanet", "lstm", 0)),
            n_q=int(get(rvq, "rvq", "n_q")),
            bins=int(get(rvq, "rvq", "bins")),
            activation_alpha=float(act_params.get("alpha", 1.0)),
            norm=str(get(seanet, "seanet", "norm", "none")),
            pad_mode=str(get(seanet, "seanet", "pad_mode", "reflect")),
            true_skip=bool(get(seanet, "seanet", "true_skip", True)),
            disable_norm_outer_blocks=int(get(seanet, "seanet", "disable_norm_outer_blocks", 0)),
        )


# ---------------------------------------------------------------------------------------------------- modules


def _fast(x: torch.Tensor) -> bool:
    """Whether a codec module may take its CPU inference path (channels-last oneDNN convolutions, exp-based ELU):
    fp32 on CPU with nothing recording the graph. Autograd (training), tracing and ONNX export keep the plain
    PyTorch modules, whose graph is the one to train and export."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export()
            and not torch.compiler.is_compiling())


def _nwc(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T] -> [B, C, 1, T] in channels-last memory ([B, T, C]); a view when x already is. In this layout the
    convolutions run on oneDNN (the transposed ones 2-5x faster than PyTorch's own 1-d kernel), and their outputs
    stay channels-last, so a stack of them converts once, at its input."""
    return x.unsqueeze(2).contiguous(memory_format=torch.channels_last)


class _Derived:
    """A tensor derived from a parameter (a reordered copy of a weight), made again when the parameter changes: in
    place (its version counter) or swapped (`.data`, `_apply`: its storage). It keeps the source's storage alive, so
    a new storage cannot reuse that address and pass for the old one."""

    def __init__(self, make: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.make = make
        self.src: torch.Tensor | None = None
        self.version = -1  # the source's version when `value` was made (a detached view shares the counter)
        self.value: torch.Tensor | None = None

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        src = self.src
        if (src is None or src.data_ptr() != w.data_ptr() or self.version != w._version or src.shape != w.shape
                or src.dtype != w.dtype or src.device != w.device):
            self.value, self.src, self.version = self.make(w.detach()), w.detach(), w._version
        return self.value  # type: ignore[return-value]


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int],
          stride: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """x [B, C_in, 1, T] channels-last, weight [C_out, C_in, 1, k] channels-last -> [B, C_out, 1, T_out]
    channels-last, on oneDNN whatever the shape (F.conv2d takes PyTorch's native kernel for one short row)."""
    if torch.backends.mkldnn.is_available():
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, padding, stride, dilation, 1)
    return F.conv2d(x, weight, bias, stride, padding, dilation)


def _channels_last_2d(w: torch.Tensor) -> torch.Tensor:
    """A Conv1d weight [C_out, C_in, k] -> [C_out, C_in, 1, k] channels-last, as `_conv` takes it."""
    return w.unsqueeze(2).contiguous(memory_format=torch.channels_last)


def _elu_exp(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """ELU for 0 < alpha <= 1 as max(x, alpha * (2^(min(x, 0) * log2 e) - 1)): exact for x > 0 (there the second
    term is 0), and for x <= 0 alpha * (e^x - 1) >= x, so the max takes the exponential branch. F.elu evaluates
    expm1 for every vector holding a negative; exp2 is ~4x cheaper. The price: an absolute error of about 1 ulp(1)
    near x = 0 (exp - 1 cancels; the scaled exponent adds <= |x| e^x 2^-24), fp32 rounding at the activations'
    scale."""
    # clamp first (min(x, 0) * log2 e = min(x * log2 e, 0) exactly: the factor is positive), so the product is
    # taken in place: one fresh tensor, not two
    e = torch.clamp(x, max=0).mul_(_LOG2E).exp2_().sub_(1)
    if alpha != 1.0:
        e.mul_(alpha)
    return torch.maximum(x, e, out=e)


class ELU(nn.ELU):
    """nn.ELU (no parameters, so no state-dict keys) that takes `_elu_exp` on the fast path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if 0.0 < self.alpha <= 1.0 and not self.inplace and _fast(x):
            return _elu_exp(x, self.alpha)
        return super().forward(x)


def _pad1d(x: torch.Tensor, left: int, right: int, mode: str) -> torch.Tensor:
    """F.pad, except that 'reflect' also works on inputs shorter than the pad (zero-extend first, as audiocraft)."""
    if mode != "reflect":
        return F.pad(x, (left, right), mode)
    length = x.shape[-1]
    extra = max(left, right) - length + 1 if length <= max(left, right) else 0
    if extra:
        x = F.pad(x, (0, extra))
    padded = F.pad(x, (left, right), mode)
    return padded[..., : padded.shape[-1] - extra]


class PaddedConv1d(nn.Module):
    """audiocraft's non-causal `StreamableConv1d`: 'same'-style padding with the total split right = total // 2,
    plus extra right padding so that the last (partial) window is computed. Output length is ceil(T / stride)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                 pad_mode: str = "constant", weight_norm: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel_size, stride=stride, dilation=dilation)
        self.pad_mode = pad_mode
        self.weight_norm = weight_norm  # how the checkpoint stores the weight (g/v or plain)
        self.k_eff = (kernel_size - 1) * dilation + 1
        self.stride = stride
        self._weight_2d = _Derived(_channels_last_2d)
        # `_conv` (oneDNN for every shape) on the fast path, or F.conv2d's own dispatch (SEANetEncoder: see there)
        self.direct = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, T] -> [B, C_out, ceil(T / stride)]
        k, s = self.k_eff, self.stride
        total = k - s
        length = x.shape[-1]
        n_frames = -(-(length - k + total) // s) + 1  # ceil((T - k + total) / s) + 1, integer-exact
        extra = (n_frames - 1) * s + (k - total) - length
        right = total // 2
        left, right = total - right, right + extra
        if not _fast(x):
            return self.conv(_pad1d(x, left, right, self.pad_mode))
        # Zero padding goes into the convolution (no padded copy of x); the conv pads both sides alike, so only
        # the excess of one side (strided convs' extra right padding) is an F.pad. Reflect padding is an F.pad.
        inner = min(left, right) if self.pad_mode == "constant" else 0
        if left > inner or right > inner:
            x = _pad1d(x, left - inner, right - inner, self.pad_mode)
        c = self.conv
        if self.direct:
            y = _conv(_nwc(x), self._weight_2d(c.weight), c.bias, (0, inner), (1, s), (1, c.dilation[0]))
        else:
            y = F.conv2d(_nwc(x), self._weight_2d(c.weight), c.bias, (1, s), (0, inner), (1, c.dilation[0]))
        return y.squeeze(2)  # [B, C_out, T_out], channels-last


class PaddedConvTranspose1d(nn.Module):
    """audiocraft's non-causal `StreamableConvTranspose1d`: full transposed conv, then trim k - stride samples
    (right = total // 2), so T frames in give exactly T * stride samples out."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, weight_norm: bool = True) -> None:
        super().__init__()
        self.convtr = nn.ConvTranspose1d(c_in, c_out, kernel_size, stride=stride)
        self.weight_norm = weight_norm
        self.total = kernel_size - stride
        self._phases = _Derived(self._polyphase)
        self._phase_bias = _Derived(lambda b: b.repeat(stride))

    def _polyphase(self, w: torch.Tensor) -> torch.Tensor:
        """The transposed conv's weight [C_in, C_out, m·r] (kernel m·r, stride r) as a conv's [r·C_out, C_in, 1, m],
        channels-last: output sample u·r + p is Σ_q w[:, :, q·r + p]ᵀ x[u − q], a conv of kernel m over x whose
        output channel (p, o) is phase p's channel o (kernel flipped: conv is cross-correlation)."""
        c = self.convtr
        r = c.stride[0]
        m = c.kernel_size[0] // r
        w = w.view(c.in_channels, c.out_channels, m, r).permute(3, 1, 0, 2).flip(-1)  # [r, C_out, C_in, m]
        return w.reshape(r * c.out_channels, c.in_channels, 1, m).contiguous(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, T] -> [B, C_out, T * stride]
        c = self.convtr
        k, r = c.kernel_size[0], c.stride[0]
        if _fast(x) and k % r == 0:
            # polyphase: one forward conv (kernel k / r) gives every output sample's r phases as channels; in
            # channels-last memory [B, T + m - 1, r, C_out] is already the sample order, so the interleave is a view
            m = k // r
            B, _, T = x.shape
            y = _conv(_nwc(x), self._phases(c.weight), self._phase_bias(c.bias), (0, m - 1), (1, 1), (1, 1))
            y = y.permute(0, 2, 3, 1).reshape(B, (T + m - 1) * r, c.out_channels).transpose(1, 2)
        elif _fast(x):  # oneDNN's channels-last kernel (PyTorch's own, for 1-d, is several times slower)
            y = F.conv_transpose2d(_nwc(x), c.weight.unsqueeze(2), c.bias, (1, r)).squeeze(2)
        else:
            y = c(x)
        # y [B, C_out, (T - 1) * stride + k] (channels-last on the fast path; the trim below is a view either way)
        right = self.total // 2
        left = self.total - right
        return y[..., left: y.shape[-1] - right]


class ResidualUnit(nn.Module):
    """SEANet residual block: x + (ELU -> conv k (c -> c/compress, dilated) -> ELU -> conv 1 (-> c)).
    Submodule indices (`block.1`, `block.3`) match audiocraft's so checkpoint keys map one to one."""

    def __init__(self, cfg: CodecConfig, dim: int, dilation: int, weight_norm: bool) -> None:
        super().__init__()
        hidden = dim // cfg.compress
        alpha, pad = cfg.activation_alpha, cfg.pad_mode
        self.block = nn.Sequential(
            ELU(alpha),
            PaddedConv1d(dim, hidden, cfg.residual_kernel_size, dilation=dilation, pad_mode=pad,
                         weight_norm=weight_norm),
            ELU(alpha),
            PaddedConv1d(hidden, dim, 1, pad_mode=pad, weight_norm=weight_norm),
        )
        self.shortcut: nn.Module = (
            nn.Identity() if cfg.true_skip else PaddedConv1d(dim, dim, 1, pad_mode=pad, weight_norm=weight_norm)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T] -> [B, C, T]
        if _fast(x):  # the block's output is a fresh tensor: add into it rather than allocate a third
            return self.block(x).add_(self.shortcut(x))
        return self.shortcut(x) + self.block(x)


class SkipLSTM(nn.Module):
    """Multi-layer LSTM over time with an identity skip (audiocraft `StreamableLSTM`, skip=True)."""

    def __init__(self, dim: int, num_layers: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, num_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T] -> [B, C, T]
        return self.carry(x, None)[0]

    def carry(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None
              ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x [B, C, T] after `state` (the (h, c) a previous call returned; None = the start) -> (y [B, C, T], the
        state after x): a sequence decoded in pieces gives the LSTM outputs of one pass (engine.longform)."""
        x = x.permute(2, 0, 1)  # [T, B, C]: nn.LSTM is time-major by default
        y, state = self.lstm(x, state)
        return (y + x).permute(1, 2, 0), state


class SEANetEncoder(nn.Module):
    """[B, C, S] -> [B, D, T]. Layout (audiocraft indices): conv; per reversed ratio r: residual units, ELU,
    conv k=2r stride r doubling channels; optional LSTM; ELU; conv -> D."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        dn, norm = cfg.disable_norm_outer_blocks, cfg.norm == "weight_norm"
        n_blocks = len(cfg.ratios) + 2
        ch = cfg.n_filters
        layers: list[nn.Module] = [
            PaddedConv1d(cfg.channels, ch, cfg.kernel_size, pad_mode=cfg.pad_mode, weight_norm=norm and dn < 1)
        ]
        for i, r in enumerate(reversed(cfg.ratios)):
            wn = norm and dn < i + 2
            layers += [ResidualUnit(cfg, ch, cfg.dilation_base**j, wn) for j in range(cfg.n_residual_layers)]
            layers += [ELU(cfg.activation_alpha),
                       PaddedConv1d(ch, ch * 2, 2 * r, stride=r, pad_mode=cfg.pad_mode, weight_norm=wn)]
            ch *= 2
        if cfg.lstm_layers:
            layers.append(SkipLSTM(ch, cfg.lstm_layers))
        layers += [ELU(cfg.activation_alpha),
                   PaddedConv1d(ch, cfg.dimension, cfg.last_kernel_size, pad_mode=cfg.pad_mode,
                                weight_norm=norm and dn != n_blocks)]
        self.model = nn.Sequential(*layers)
        # Encoding picks each codeword by nearest distance, so its numerics stay PyTorch's dispatch: oneDNN's order
        # rounds the deep last conv (C·k = 1792 terms on the default codec) ~8 ulps where the native GEMM rounds ~1.
        for m in self.modules():
            if isinstance(m, PaddedConv1d):
                m.direct = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class SEANetDecoder(nn.Module):
    """[B, D, T] -> [B, C, T * hop]. Layout (audiocraft indices): conv D -> n_filters * 2^len(ratios); optional
    LSTM; per ratio r: ELU, transposed conv k=2r stride r halving channels, residual units; ELU; conv -> C.
    No final activation (the fixture's config has none) and no output scaling."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        dn, norm = cfg.disable_norm_outer_blocks, cfg.norm == "weight_norm"
        n_blocks = len(cfg.ratios) + 2
        ch = cfg.n_filters * 2 ** len(cfg.ratios)
        layers: list[nn.Module] = [
            PaddedConv1d(cfg.dimension, ch, cfg.kernel_size, pad_mode=cfg.pad_mode, weight_norm=norm and dn != n_blocks)
        ]
        if cfg.lstm_layers:
            layers.append(SkipLSTM(ch, cfg.lstm_layers))
        for i, r in enumerate(cfg.ratios):
            wn = norm and dn < n_blocks - (i + 1)
            layers += [ELU(cfg.activation_alpha), PaddedConvTranspose1d(ch, ch // 2, 2 * r, r, weight_norm=wn)]
            ch //= 2
            layers += [ResidualUnit(cfg, ch, cfg.dilation_base**j, wn) for j in range(cfg.n_residual_layers)]
        layers += [ELU(cfg.activation_alpha),
                   PaddedConv1d(ch, cfg.channels, cfg.last_kernel_size, pad_mode=cfg.pad_mode,
                                weight_norm=norm and dn < 1)]
        self.model = nn.Sequential(*layers)
        # (layer, shape, threads) -> whether its batched call is row-exact; None: seen once, not probed. Not the
        # strides: the convs read channels-last whatever they are given (`_nwc`), the rest is elementwise.
        self._row_exact: dict[tuple[int, tuple[int, ...], int], bool | None] = {}

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z)

    def forward_rows(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D, T] -> [B, C, T * hop] whose every row is bit for bit `forward` of that row alone ([1, D, T]).

        On the CPU fast path a layer runs on the whole batch where a probe showed that its batched call computes
        each row as the row alone, at this input shape and thread count, and row by row elsewhere. oneDNN picks its
        kernel and blocking from the shape and the threads, not from the values, so one probe per (layer, shape,
        threads), on random values (they expose any other summation order), decides for every later call;
        `_row_exact` remembers it. A shape seen for the first time runs row by row unprobed, as a decode of each row
        alone would: the probe costs about that plus the batched call, which only pays for shapes that recur. On the
        2-core AMD EPYC of bench/RESULTS.md, for 16 rows of 1 s, the transposed convolutions of the last two rates
        are the row-variant ones. Elsewhere (autograd, other dtypes, CUDA, whose kernels may be picked by timing)
        every row runs alone."""
        x = z
        for i, layer in enumerate(self.model):
            if x.shape[0] == 1:
                x = layer(x)
            elif _fast(x) and self._rows_exact_in_batch(i, layer, x):
                x = layer(x)
            else:
                x = _stack_rows([layer(row) for row in x.split(1)])
        return x

    def _rows_exact_in_batch(self, i: int, layer: nn.Module, x: torch.Tensor) -> bool:
        key = (i, tuple(x.shape), torch.get_num_threads())
        if key not in self._row_exact:
            if len(self._row_exact) >= 4096:  # shapes a long-lived process has seen: bounded
                self._row_exact.clear()
            self._row_exact[key] = None
            return False
        exact = self._row_exact[key]
        if exact is None:
            # random values for one row (a generator draws on one thread: for the whole batch it took longer than
            # the probe's convs), each row a distinct scaling of them
            row = torch.rand((1, *x.shape[1:]), generator=torch.Generator().manual_seed(i)).mul_(2).sub_(1)
            scale = 1.0 + torch.arange(x.shape[0], dtype=x.dtype).view(-1, 1, 1) / 1024  # [B, 1, 1]
            probe = torch.mul(row, scale, out=torch.empty_strided(x.shape, x.stride(), dtype=x.dtype))
            exact = self._row_exact[key] = torch.equal(layer(probe), _stack_rows([layer(r) for r in probe.split(1)]))
        return exact


def _stack_rows(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rows [1, C, T] -> [N, C, T] in the rows' own memory layout (channels-last on the fast path), so that the next
    layer reads the batch as each row alone would be read."""
    first = rows[0]
    if first.stride(1) == 1 and first.shape[1] > 1:  # channels-last
        out = first.new_empty(len(rows), first.shape[2], first.shape[1]).transpose(1, 2)
    else:
        out = first.new_empty(len(rows), *first.shape[1:])
    for row, r in zip(out.split(1), rows):
        row.copy_(r)
    return out


class ResidualVQ(nn.Module):
    """K stacked codebooks, `embed` [K, bins, D]. Codeword width = D: no in/out projection."""

    def __init__(self, n_q: int, bins: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("embed", torch.zeros(n_q, bins, dim))

    def encode(self, z: torch.Tensor) -> torch.Tensor:  # [B, D, T] -> [B, K, T] int64
        B, D, T = z.shape
        residual = z
        codes = []
        for embed in self.embed:  # [bins, D]
            x = residual.transpose(1, 2).reshape(B * T, D)  # [B*T, D]
            e = embed.t()  # [D, bins]
            # Same expression and order as audiocraft's EuclideanCodebook.quantize, so near-ties resolve alike.
            dist = -(x.pow(2).sum(1, keepdim=True) - 2 * x @ e + e.pow(2).sum(0, keepdim=True))  # [B*T, bins]
            idx = dist.max(dim=-1).indices.view(B, T)
            codes.append(idx)
            residual = residual - F.embedding(idx, embed).transpose(1, 2)
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:  # [B, K, T] int64 -> [B, D, T]
        z = torch.zeros((), dtype=self.embed.dtype, device=self.embed.device)
        for k in range(codes.shape[1]):  # summed in codebook order, like audiocraft
            z = z + F.embedding(codes[:, k], self.embed[k])  # [B, T, D]
        return z.transpose(1, 2)


# ------------------------------------------------------------------------------------------------------ model


class Encodec(nn.Module):
    """EnCodec codec: `decode(codes [B, K, T]) -> wav [B, 1, T * hop]`, `encode(wav [B, 1, S]) -> codes`."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = SEANetEncoder(cfg)
        self.decoder = SEANetDecoder(cfg)
        self.quantizer = ResidualVQ(cfg.n_q, cfg.bins, cfg.dimension)

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def frame_rate(self) -> int:
        return self.config.frame_rate

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T] integer in [0, bins) -> waveform [B, 1, T * hop] float32 (no scaling, no clipping)."""
        codes = self._check_codes(codes)
        return self.decoder(self.quantizer.decode(codes))

    @torch.no_grad()
    def decode_rows(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T] -> waveform [B, 1, T * hop], each row bit for bit what `decode` gives it alone ([1, K, T]):
        rows batched where the codec's kernels keep each row's arithmetic (`SEANetDecoder.forward_rows`)."""
        codes = self._check_codes(codes)
        return self.decoder.forward_rows(self.quantizer.decode(codes))

    @torch.no_grad()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """waveform [B, 1, S] float at `sample_rate` -> codes [B, K, T] int64 with T = ceil(S / hop): the last
        partial frame is zero-padded, as in audiocraft."""
        check_wav(wav, self.config.channels)
        p = self.quantizer.embed
        return self.quantizer.encode(self.encoder(wav.to(device=p.device, dtype=p.dtype)))

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        check_codes(codes, self.config.n_q, self.config.bins)
        return codes.to(device=self.quantizer.embed.device, dtype=torch.long)

    @classmethod
    def from_package(cls, package: dict[str, Any]) -> Encodec:
        """Build from an audiocraft codec package `{'best_state', 'xp.cfg', ...}` and load its weights strictly
        (ValueError naming missing/unexpected keys or shape mismatches)."""
        if not isinstance(package, dict):
            raise TypeError(f"codec package must be a dict, got {type(package).__name__}")
        if "pretrained" in package and "best_state" not in package:
            raise ValueError(f"this codec package only points at {package['pretrained']!r} (a transformers-format "
                             "codec); use a package with 'best_state' and 'xp.cfg' (audiocraft export format)")
        missing_top = [k for k in ("best_state", "xp.cfg") if k not in package]
        if missing_top:
            raise ValueError(f"codec package lacks {missing_top}; expected audiocraft's export format "
                             "{'best_state', 'xp.cfg', 'version', 'exported'}")
        xp_cfg = package["xp.cfg"]
        if isinstance(xp_cfg, str):
            import yaml  # only audiocraft packages need it: our format's load skips the import

            try:
                xp_cfg = yaml.safe_load(xp_cfg)
            except yaml.YAMLError as e:
                raise ValueError(f"codec package: xp.cfg is not valid YAML ({e})") from e
        if not isinstance(xp_cfg, dict):
            xp_cfg = {}  # an empty/odd xp.cfg: from_xp_cfg then names the first missing section
        model = cls(CodecConfig.from_xp_cfg(xp_cfg))
        model.load_audiocraft_state(package["best_state"])
        return model.eval()

    def load_audiocraft_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load an audiocraft EnCodec `best_state`, folding weight norm into plain weights."""
        # Newer torch (parametrize-based weight_norm) names g/v `parametrizations.weight.original{0,1}`.
        state = {k.replace(".parametrizations.weight.original0", ".weight_g")
                  .replace(".parametrizations.weight.original1", ".weight_v"): v for k, v in state.items()}
        used: set[str] = set()
        missing: list[str] = []
        out: dict[str, torch.Tensor] = {}

        def take(key: str) -> torch.Tensor | None:
            if key not in state:
                missing.append(key)
                return None
            used.add(key)
            t = state[key]
            if isinstance(t, torch.Tensor):
                return t.float()
            raise ValueError(f"codec state entry {key} is a {type(t).__name__}, not a tensor; corrupt package")

        for name, mod in self.named_modules():
            if isinstance(mod, (PaddedConv1d, PaddedConvTranspose1d)):
                inner = "conv" if isinstance(mod, PaddedConv1d) else "convtr"
                src, dst = f"{name}.{inner}.{inner}", f"{name}.{inner}"  # audiocraft nests Norm* -> nn.Conv
                if mod.weight_norm:
                    g, v = take(f"{src}.weight_g"), take(f"{src}.weight_v")
                    if g is not None and v is not None:
                        # torch.nn.utils.weight_norm(dim=0): norm over all dims but 0 (c_out for Conv1d, c_in for
                        # ConvTranspose1d, whose weight is [c_in, c_out, k]); same op order as torch._weight_norm.
                        out[f"{dst}.weight"] = v * (g / v.norm(dim=tuple(range(1, v.dim())), keepdim=True))
                else:
                    w = take(f"{src}.weight")
                    if w is not None:
                        out[f"{dst}.weight"] = w
                b = take(f"{src}.bias")
                if b is not None:
                    out[f"{dst}.bias"] = b
            elif isinstance(mod, SkipLSTM):
                for pname in mod.lstm.state_dict():
                    t = take(f"{name}.lstm.{pname}")
                    if t is not None:
                        out[f"{name}.lstm.{pname}"] = t
            elif isinstance(mod, ResidualVQ):
                embeds = [take(f"{name}.vq.layers.{k}._codebook.embed") for k in range(self.config.n_q)]
                if all(e is not None for e in embeds):
                    if len({tuple(e.shape) for e in embeds}) != 1:
                        raise ValueError(f"codebooks differ in shape: {[tuple(e.shape) for e in embeds]}")
                    out[f"{name}.embed"] = torch.stack(embeds)  # [K, bins, D]
                for k in range(self.config.n_q):
                    used.update(f"{name}.vq.layers.{k}._codebook.{b}" for b in _VQ_TRAINING_BUFFERS)
        unexpected = sorted(set(state) - used)
        if missing or unexpected:
            raise ValueError(f"codec state does not match xp.cfg: missing {_preview(missing)}, unexpected "
                             f"{_preview(unexpected)}; is the config from the same checkpoint?")
        expected = self.state_dict()
        wrong = [f"{k}: checkpoint {tuple(out[k].shape)} vs config {tuple(v.shape)}"
                 for k, v in expected.items() if k in out and out[k].shape != v.shape]
        if wrong:
            raise ValueError(f"codec tensor shapes do not match xp.cfg: {_preview(wrong)}")
        self.load_state_dict(out, strict=True)


def check_codes(codes: torch.Tensor, n_q: int, bins: int) -> None:
    """Validate codes [B, K, T] for decoding (shared by every codec backend); TypeError/ValueError say the fix."""
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"decode expects a torch.LongTensor [B, K, T], got {type(codes).__name__}; "
                        "wrap it with torch.as_tensor(codes, dtype=torch.long)")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"decode expects integer codes, got dtype {codes.dtype}; convert with codes.long() "
                        "(codes are codebook indices, not audio)")
    if codes.dim() != 3 or codes.shape[1] != n_q or codes.shape[2] == 0:
        raise ValueError(f"decode expects codes [B, {n_q}, T>0] (K = n_q = {n_q} codebooks), "
                         f"got {tuple(codes.shape)}")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= bins:
        bad = hi if hi >= bins else lo
        hint = " (the MAGNeT mask token: generation left masked positions)" if bad == bins else ""
        raise ValueError(f"codes must lie in [0, {bins}); found {bad}{hint}; decode only finished token sequences")


def check_wav(wav: torch.Tensor, channels: int) -> None:
    """Validate a waveform [B, C, samples] for encoding (shared by every codec backend)."""
    if not isinstance(wav, torch.Tensor) or not wav.is_floating_point():
        raise TypeError("encode expects a floating-point torch.Tensor [B, 1, samples]")
    if wav.dim() != 3 or wav.shape[1] != channels or wav.shape[-1] == 0:
        raise ValueError(f"encode expects wav [B, {channels}, samples>0], got {tuple(wav.shape)}; "
                         "add batch/channel dims with wav.view(1, 1, -1) and downmix to mono first")


def _preview(items: list[str], n: int = 6) -> str:
    return "[]" if not items else str(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def load_codec(path: str | Path) -> Encodec:
    """Load an audiocraft `compression_state_dict.bin` with `weights_only=True` (no code is ever unpickled)."""
    from .loading import load_weights_only

    package = load_weights_only(Path(path), "codec checkpoint")
    if isinstance(package, dict):
        return Encodec.from_package(package)
    raise ValueError(f"{path} holds a {type(package).__name__}, not a codec package dict; "
                     "expected audiocraft's compression_state_dict.bin")
