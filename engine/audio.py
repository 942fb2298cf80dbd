"""Writing and reading WAV files (soundfile; no torchaudio), with peak or loudness normalisation."""
from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .config import SettingError

if TYPE_CHECKING:  # torch is imported where used: the CLI builds its parser from this module without it
    import torch

NORMALIZE = ("peak", "loudness", "none")
SUBTYPES = {"pcm16": "PCM_16", "float32": "FLOAT"}  # of a .wav; FLAC stores 16-bit PCM, Ogg Vorbis its own
# output extension -> soundfile format (and subtype when fixed by the format)
FORMATS = {".wav": ("WAV", None), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS")}
TARGET_LUFS = -14.0  # audiocraft's `audio_write(strategy="loudness")` default, as in the MAGNeT docs


@dataclass(frozen=True)
class OutputConfig:
    """How generated audio is written."""

    normalize: str = "peak"  # audiocraft `audio_write`'s default strategy
    wav_subtype: str = "pcm16"

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZE:
            raise ValueError(f"unknown normalisation {self.normalize!r}: choose one of {NORMALIZE}")
        if self.wav_subtype not in SUBTYPES:
            raise ValueError(f"unknown WAV subtype {self.wav_subtype!r}: choose one of {sorted(SUBTYPES)}")


def k_weighted_loudness(wav: np.ndarray, sample_rate: int) -> float:
    """Integrated loudness (ITU-R BS.1770, mono) in LUFS. wav [samples]. The K-weighting filter is applied in the
    frequency domain (its two biquads' response on the rFFT grid), gating as the standard: 400 ms blocks, 75%
    overlap, −70 LUFS absolute and −10 LU relative gates."""
    n = len(wav)
    if n == 0:
        return -math.inf
    freqs = np.fft.rfftfreq(2 * n, 1 / sample_rate)
    z = np.exp(-2j * np.pi * freqs / sample_rate)
    # BS.1770 stage 1 (high shelf) and stage 2 (high pass), coefficients for 48 kHz re-derived for `sample_rate`
    # through the analogue prototypes (pyloudnorm's formulation).
    def biquad(b: tuple[float, float, float], a: tuple[float, float, float]) -> np.ndarray:
        return (b[0] + b[1] * z + b[2] * z**2) / (a[0] + a[1] * z + a[2] * z**2)

    g, q, fc = 3.99984385397, 0.7071752369554193, 1681.9744509555319
    k = math.tan(math.pi * fc / sample_rate)
    vh = 10 ** (g / 20)
    vb = vh**0.4996667741545416
    a0 = 1 + k / q + k * k
    shelf = biquad(((vh + vb * k / q + k * k) / a0, 2 * (k * k - vh) / a0, (vh - vb * k / q + k * k) / a0),
                   (1.0, 2 * (k * k - 1) / a0, (1 - k / q + k * k) / a0))
    q2, fc2 = 0.5003270373253953, 38.13547087613982
    k2 = math.tan(math.pi * fc2 / sample_rate)
    a02 = 1 + k2 / q2 + k2 * k2
    highpass = biquad((1.0, -2.0, 1.0), (1.0, 2 * (k2 * k2 - 1) / a02, (1 - k2 / q2 + k2 * k2) / a02))
    y = np.fft.irfft(np.fft.rfft(wav, 2 * n) * shelf * highpass)[:n]
    block, hop = int(0.4 * sample_rate), int(0.1 * sample_rate)
    if n < block:
        powers = np.array([np.mean(y**2)])
    else:
        starts = range(0, n - block + 1, hop)
        powers = np.array([np.mean(y[s:s + block] ** 2) for s in starts])
    lufs = -0.691 + 10 * np.log10(np.maximum(powers, 1e-12))
    gated = powers[lufs > -70]
    if gated.size == 0:
        return -math.inf
    rel = -0.691 + 10 * np.log10(np.mean(gated)) - 10
    gated = powers[(lufs > -70) & (lufs > rel)]
    return float(-0.691 + 10 * np.log10(np.mean(gated))) if gated.size else -math.inf


def normalize(wav: torch.Tensor, sample_rate: int, mode: str) -> torch.Tensor:
    """wav [C, samples] -> scaled copy: 'peak' to 0.99 max, 'loudness' to −14 LUFS (never clipping), 'none'."""
    if mode not in NORMALIZE:
        raise ValueError(f"unknown normalisation {mode!r}: choose one of {NORMALIZE}")
    peak = float(wav.abs().max()) if wav.numel() else 0.0
    if mode == "none" or peak == 0.0:
        return wav
    if mode == "peak":
        return wav * (0.99 / peak)
    lufs = k_weighted_loudness(wav.mean(0).double().numpy(), sample_rate)
    gain = 10 ** ((TARGET_LUFS - lufs) / 20) if math.isfinite(lufs) else 1.0
    return wav * min(gain, 0.99 / peak)


def audio_format(path: Path) -> str:
    """The soundfile format an output path asks for by its extension (.wav, .flac, .ogg); others refused."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise SettingError(f"cannot write {path}: <output> must end in {', '.join(FORMATS)} (the extension picks "
                           f"the format), not {path.suffix or 'nothing'}")
    return fmt[0]


def check_writable(path: Path) -> None:
    """Fail before generating when `path` cannot be created: its folder is missing, not writable, or refuses a file
    (tried for real with a probe file, so /proc, read-only mounts and full quotas are caught too)."""
    folder = path.parent if path.parent != Path("") else Path(".")
    if not folder.is_dir():
        raise SettingError(f"cannot write {path}: folder {folder} does not exist; create it or choose another "
                           "<output>")
    if path.is_dir():
        raise SettingError(f"cannot write {path}: it is a folder; give a file name to <output>")
    probe = _new_file(folder)
    if isinstance(probe, OSError):
        raise SettingError(f"cannot write {path}: {probe.strerror or probe}; choose another <output>")
    os.remove(probe)


def _new_file(folder: Path) -> Path | OSError:
    """Create an empty, hidden, uniquely named file in `folder` with the user's umask (mode 0666 & ~umask, as any
    new file; mkstemp would make it 0600) -> its path, or the error."""
    path = folder / f".{secrets.token_hex(6)}.part"
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except OSError as e:
        return e
    return path


def check_format(suffix: str) -> tuple[str, str | None]:
    """A format by extension (".wav", ".flac", ".ogg") -> (soundfile format, fixed subtype or None), or a SettingError
    naming <format>."""
    fmt = FORMATS.get(suffix.lower()) if isinstance(suffix, str) else None
    if fmt is None:
        raise SettingError(f"unknown audio <format> {str(suffix).lstrip('.')!r}: choose one of "
                           f"{', '.join(s.lstrip('.') for s in FORMATS)}")
    return fmt


def audio_bytes(wav: torch.Tensor, sample_rate: int, suffix: str = ".wav", subtype: str = "pcm16") -> bytes:
    """wav [C, samples] float -> the bytes of a file in the format `suffix` names (.wav in `subtype`, .flac, .ogg):
    what `write_audio` stores, for front ends that send audio rather than write it (the HTTP service)."""
    import io

    import soundfile as sf

    fmt = check_format(suffix)
    if subtype not in SUBTYPES:
        raise SettingError(f"unknown <wav_subtype> {subtype!r}: choose one of {', '.join(SUBTYPES)}")
    sub = SUBTYPES[subtype] if fmt[0] == "WAV" else fmt[1]
    buf = io.BytesIO()
    sf.write(buf, _frames(wav), sample_rate, subtype=sub, format=fmt[0])
    return buf.getvalue()


def _frames(wav: torch.Tensor) -> np.ndarray:
    """wav [C, samples] float -> the [samples, C] float32 array soundfile writes, clipped to [-1, 1]."""
    return wav.detach().cpu().float().clamp(-1, 1).numpy().T


def pcm16_bytes(wav: torch.Tensor) -> bytes:
    """wav [C, samples] float -> interleaved 16-bit little-endian PCM, converted as `audio_bytes` converts (through
    libsndfile), for a WAV sent a chunk at a time."""
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, _frames(wav), 8000, subtype="PCM_16", format="RAW", endian="LITTLE")  # RAW: no rate stored
    return buf.getvalue()


def wav_stream_header(sample_rate: int, channels: int = 1) -> bytes:
    """The 44-byte header of a 16-bit PCM WAV whose length is not known yet (RIFF and data sizes 0xFFFFFFFF, as
    streamed WAVs state it): players read the samples as they arrive."""
    import struct

    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate,
            sample_rate * channels * 2, channels * 2, 16) + b"data" + struct.pack("<I", unknown))


def write_audio(path: Path, wav: torch.Tensor, sample_rate: int, subtype: str = "pcm16") -> None:
    """wav [C, samples] float -> `path` in the format its extension names (.wav in `subtype`, .flac, .ogg), written
    to a temporary name in the same folder first, so no half file is ever left under `path`."""
    audio_format(path)
    tmp = _new_file(path.parent if str(path.parent) else Path("."))
    if isinstance(tmp, OSError):
        raise SettingError(f"cannot write {path}: {tmp.strerror or tmp}; choose another <output>")
    try:
        tmp.write_bytes(audio_bytes(wav, sample_rate, path.suffix, subtype))
        os.replace(tmp, path)
    except (RuntimeError, OSError) as e:  # soundfile's LibsndfileError is a RuntimeError
        raise SettingError(f"cannot write {path}: {getattr(e, 'strerror', None) or e}") from None
    finally:
        if tmp.exists():
            os.remove(tmp)


def read_wav(path: Path, sample_rate: int) -> torch.Tensor:
    """A WAV at the codec's rate -> [1, 1, samples] fp32 mono (channels averaged)."""
    import soundfile as sf
    import torch

    if not path.is_file():
        why = "it is a folder" if path.is_dir() else "no such file"
        raise SettingError(f"cannot read <prompt_audio> {path}: {why}")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as e:  # soundfile raises LibsndfileError (a RuntimeError) for bad files
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SettingError(f"cannot read <prompt_audio> {path}: not an audio file soundfile reads ({why})") from None
    if sr != sample_rate:
        raise SettingError(f"<prompt_audio> {path} is {sr} Hz; the model's codec needs {sample_rate} Hz: resample "
                           f"it first (e.g. sox {path.name} -r {sample_rate} out.wav)")
    return torch.from_numpy(data.mean(axis=1)).view(1, 1, -1)
