"""Long-form generation: a piece longer than the model's segment as a chain of continuations, decoded to audio as it
grows.

Windows (W = one segment's output frames, C = context frames, N = the piece's frames = duration × frame rate):

    window 0   [0, W)                      the plain one-segment run: same settings, prompt, levers and seed
    window 1   [W − C, W − C + L1)         continues from the last C tokens of the piece (its prompt), L1 <= W
    window w   [end − C, end − C + Lw)     ... until N frames; the last window is only as long as it needs

Every window re-uses the text prompt (its conditioning is computed once) and draws its noise from the same
per-row generators, which simply run on from window to window: one seed gives the whole piece, and window 0 draws
exactly what the plain run draws. An audio prompt / prompt codes seed window 0 only; so does the hybrid's AR prefix;
a rescorer rescores every window. The decoding of each window is the engine's one continuation path
(`Engine._segment` -> magnet.stepping / musicgen.generate_tokens_ar with the context as prompt).

Audio: `StreamDecoder` decodes the token sequence as it grows, with the codec's state carried, so the audio has no
seam: the sample at time t is what the codec computes from the whole sequence. EnCodec's decoder is convolutions
(finite reach) around an optional LSTM (unbounded past, no future). The decoder keeps the LSTM's state and, for the
convolutions, recomputes a few frames of past context and holds back the last frames whose samples still depend on
tokens not generated yet (their lookahead, `Reach`), emitting them with the next window. Each sample is therefore a
function of exactly the tokens the whole-sequence decode uses; only float summation order can differ.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

# the frame arithmetic of a piece lives in engine.config (GenerationConfig.check_for needs it); re-exported here
from .config import (  # noqa: F401
    DEFAULT_CONTEXT,
    GenerationConfig,
    ModelConfig,
    SettingError,
    check_context,
    context_range,
    first_window,
    frame_multiple,
    is_long,
    output_frames,
)


@dataclass(frozen=True)
class Window:
    index: int
    start: int  # the piece's frame at the window's first frame
    context: int  # frames continued from the piece (window 0: 0; its own prompt, if any, is the request's)
    keep: int  # frames after the context that go into the piece (the last window may decode a few more)
    gen: GenerationConfig  # its settings; gen.duration = its length in frames / frame rate


def plan(model: ModelConfig, gen: GenerationConfig) -> list[Window]:
    """The windows of a piece of gen.frames(model) frames (one window when it fits in a segment)."""
    first = first_window(model, gen)
    if first is gen:
        return [Window(0, 0, 0, output_frames(model, gen), gen)]
    n, w, c = gen.frames(model), output_frames(model, first), check_context(model, gen)
    # later windows: no hybrid prefix (it wrote window 0), lengths that nonoverlap keeps whole (multiples of w's span)
    later = dataclasses.replace(gen, hybrid_prefix=0.0)
    span = frame_multiple(model, gen)
    windows, end = [Window(0, 0, 0, w, first)], w
    while end < n:
        keep = min(n - end, w - c)
        length = min(w, -(-(c + keep) // span) * span)  # ceil to the span; w is a multiple of it
        windows.append(Window(len(windows), end - c, c, keep,
                              dataclasses.replace(later, duration=length / model.frame_rate)))
        end += keep
    return windows


# ------------------------------------------------------------------------------------------------------ audio


@dataclass(frozen=True)
class Reach:
    """How far a stack of convolutions looks, in frames of its input: `back` frames of past, `ahead` of future."""

    back: int
    ahead: int

    @classmethod
    def of(cls, layers: Sequence[nn.Module]) -> Reach:
        """Summed over every (transposed) convolution in order, each converted to frames at its own rate; rounded
        up, plus one frame for the integer division of strided positions. An upper bound: only costs recompute."""
        from .codec import PaddedConv1d, PaddedConvTranspose1d

        back = ahead = 0.0
        rate = 1.0  # the current layer's input steps per frame
        for layer in layers:
            for m in layer.modules():
                if isinstance(m, PaddedConv1d):
                    pad = m.k_eff - m.stride
                    left = pad - pad // 2
                    back, ahead = back + left / rate, ahead + (m.k_eff - 1 - left) / rate
                    rate /= m.stride
                elif isinstance(m, PaddedConvTranspose1d):
                    k, s = m.convtr.kernel_size[0], m.convtr.stride[0]
                    left = m.total - m.total // 2
                    back, ahead = back + (k - 1 - left) / s / rate, ahead + left / s / rate
                    rate *= s
        return cls(math.ceil(back) + 1, math.ceil(ahead) + 1)


def _window(layers: nn.Module, x: torch.Tensor, a: int, b: int, n: int, reach: Reach, per_frame: int
            ) -> torch.Tensor:
    """Outputs of frames [a, b) of a convolution stack over x [B, C, n frames]: run on [a − back, b + ahead] only
    (clipped to the sequence, where the stack's own edge padding is the whole sequence's), then cut."""
    lo, hi = max(0, a - reach.back), min(n, b + reach.ahead)
    y = layers(x[..., lo:hi])
    return y[..., (a - lo) * per_frame:(b - lo) * per_frame]


class StreamDecoder:
    """Token frames arriving in order -> audio, emitted as soon as no future token can change it.

    `push(codes [B, K, n], last)` -> audio [B, 1, m·hop] (the codec's dtype) for the m frames that became final:
    the concatenation of every push's audio is the codec's decode of all the codes, T·hop samples. Codecs without
    the torch EnCodec decoder (onnxruntime) decode the whole sequence at the last push instead (earlier pushes
    return no audio).
    """

    def __init__(self, codec: object) -> None:
        from .codec import SEANetDecoder, SkipLSTM

        self.codec = codec
        self.codes: list[torch.Tensor] = []  # only for codecs decoded whole
        decoder = getattr(codec, "decoder", None)
        self.torch = isinstance(decoder, SEANetDecoder)
        if not self.torch:
            return
        self.hop = codec.hop_length
        layers = list(decoder.model)
        cut = next((i for i, m in enumerate(layers) if isinstance(m, SkipLSTM)), None)
        self.lstm: SkipLSTM | None = None if cut is None else layers[cut]
        self.pre = nn.Sequential(*layers[:0 if cut is None else cut])  # frames -> frames, before the LSTM
        self.post = nn.Sequential(*layers[0 if cut is None else cut + 1:])  # frames -> samples
        self.pre_reach, self.post_reach = Reach.of(self.pre), Reach.of(self.post)
        self.z: torch.Tensor | None = None  # [B, D, N − z_start] latents, from the first frame still read
        self.z_start = 0
        self.x: torch.Tensor | None = None  # [B, C, M] post-stack inputs (LSTM outputs), frames [x_start, M)
        self.x_start = 0
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None  # the LSTM's (h, c)
        self.n_pre = 0  # frames through the LSTM
        self.n_out = 0  # frames emitted as audio

    @torch.no_grad()
    def push(self, codes: torch.Tensor, last: bool) -> torch.Tensor:
        if not self.torch:
            self.codes.append(codes)
            if not last:
                return torch.zeros(codes.shape[0], 1, 0, device=codes.device)
            return self.codec.decode(torch.cat(self.codes, dim=-1))
        z = self.codec.quantizer.decode(self.codec._check_codes(codes))  # [B, D, n]
        self.z = z if self.z is None else torch.cat([self.z, z], dim=-1)
        n = self.z_start + self.z.shape[-1]
        if self.lstm is None:
            x, x_start, avail = self.z, self.z_start, n
        else:
            ready = n if last else n - self.pre_reach.ahead
            if ready > self.n_pre:
                h = _window(self.pre, self.z, self.n_pre - self.z_start, ready - self.z_start, n - self.z_start,
                            self.pre_reach, 1)  # [B, C, new]
                y, self.state = self.lstm.carry(h, self.state)
                self.x = y if self.x is None else torch.cat([self.x, y], dim=-1)
                self.n_pre = ready
            # the post stack reads back at most `back` frames before the next one to emit
            self.x, self.x_start = _trim(self.x, self.x_start, self.n_out - self.post_reach.back)
            x, x_start, avail = self.x, self.x_start, self.n_pre
        ready = avail if last else avail - self.post_reach.ahead
        if x is None or ready <= self.n_out:
            wav = self.z.new_zeros(self.z.shape[0], 1, 0)
        else:
            wav = _window(self.post, x, self.n_out - x_start, ready - x_start, avail - x_start, self.post_reach,
                          self.hop)
            self.n_out = ready
        # latents no later push reads: before the pre stack's reach (or, without an LSTM, the post stack's)
        keep_from = self.n_out - self.post_reach.back if self.lstm is None else self.n_pre - self.pre_reach.back
        self.z, self.z_start = _trim(self.z, self.z_start, keep_from)
        return wav


def _trim(x: torch.Tensor | None, start: int, keep_from: int) -> tuple[torch.Tensor | None, int]:
    """Frames [start, ...) of x -> those from `keep_from` on (nothing dropped when keep_from <= start), so that a
    piece's decoding holds a bounded window of frames instead of copying the whole piece at every push."""
    drop = keep_from - start
    if x is None or drop <= 0:
        return x, start
    return x[..., drop:], start + drop
