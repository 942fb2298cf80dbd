"""Stage 1 (`codec`) and 2 (`tokens`): a small EnCodec (the engine's `Encodec` module, trained as is) and the corpus
tokenised once with it for both LMs.

Codec: 16 kHz mono, hop 320 = 8·5·4·2 -> 50 frames/s, 4 codebooks × 1024 bins, n_filters 16, latent 64, no LSTM.
Objective (no adversary, to fit the CPU budget):
    L = w_l1·L1(wav) + multi-res STFT (spectral convergence + log-magnitude L1, n_fft 64..2048) + log-mel L1
        + commitment, with the waveform term weighted far above the rest (CodecTrainConfig.w_l1)
with a straight-through estimator through the residual VQ. Codebooks: k-means initialised from encoder outputs after
`vq_start` steps of plain autoencoding, then EMA updates (decay 0.99), dead codes re-seeded from the batch.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from magnet_engine.engine.codec import CodecConfig, Encodec
from torch import nn

from . import common

SCALES = (2048, 1024, 512, 256, 128, 64)  # multi-resolution STFT window sizes (hop = n_fft / 4)


def codec_config(n_filters: int = 16, dimension: int = 64, bins: int = 1024, n_q: int = 4,
                 sample_rate: int = 16000) -> CodecConfig:
    """The shipped codec's shape: EnCodec layout, small widths so that decoding 10 s takes well under a second."""
    return CodecConfig(sample_rate=sample_rate, channels=1, dimension=dimension, n_filters=n_filters,
                       ratios=(8, 5, 4, 2), n_residual_layers=1, kernel_size=7, last_kernel_size=7,
                       residual_kernel_size=3, dilation_base=2, compress=2, lstm_layers=0, n_q=n_q, bins=bins,
                       norm="none", pad_mode="constant")


@dataclass
class CodecTrainConfig:
    steps: int = 3600
    batch: int = 8
    crop: float = 0.5  # seconds per training example
    lr: float = 1e-3
    warmup: int = 30
    vq_start: int = 150  # plain autoencoder steps before the k-means init of the codebooks
    n_clips: int = 256  # 10 s training clips rendered once and cropped at random
    n_valid: int = 16
    clip_duration: float = 10.0
    n_filters: int = 16
    dimension: int = 64
    bins: int = 1024
    commit: float = 1.0
    # loss weights: waveform L1, multi-resolution STFT, log-mel (the commitment weight is `commit`). The waveform term
    # is what teaches the phase: at weight 1 (spectral terms dominate) the decoder learned only a 50 Hz frame buzz
    # (SI-SNR -50 dB, no pitch), at 20/50/100 it reached +2.8/+4.4/+5.4 dB with the key kept (500-step trials).
    w_l1: float = 100.0
    w_mrstft: float = 1.0
    w_mel: float = 1.0
    ema_decay: float = 0.99
    seed: int = 0
    save_every: int = 100
    log_every: int = 20
    max_minutes: float = 30.0  # > 0: stop (and save) after this much wall time (a CPU budget); a rerun resumes


# ------------------------------------------------------------------------------------------------------ VQ


class RVQTrainer(nn.Module):
    """Training side of the engine's `ResidualVQ` (which holds only `embed` [K, bins, D]): EMA statistics, k-means
    initialisation, dead-code re-seeding and the straight-through forward."""

    def __init__(self, embed: torch.Tensor, decay: float = 0.99, eps: float = 1e-5, dead: float = 1.0) -> None:
        super().__init__()
        k, bins, d = embed.shape
        self.embed = embed  # the codec's buffer, updated in place
        self.decay, self.eps, self.dead = decay, eps, dead
        self.register_buffer("cluster_size", torch.zeros(k, bins))
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("inited", torch.zeros((), dtype=torch.bool))

    def state(self) -> dict[str, torch.Tensor]:
        return {"cluster_size": self.cluster_size, "embed_avg": self.embed_avg, "inited": self.inited}

    @torch.no_grad()
    def kmeans_init(self, z: torch.Tensor, iters: int = 10, generator: torch.Generator | None = None) -> None:
        """z [M, D] encoder outputs -> codebook k = k-means of the residual after codebooks < k."""
        residual = z.clone()
        bins = self.embed.shape[1]
        for k in range(self.embed.shape[0]):
            pick = torch.randperm(residual.shape[0], generator=generator)[:bins]
            if len(pick) < bins:  # fewer vectors than codes: repeat with noise
                pick = pick[torch.randint(len(pick), (bins,), generator=generator)]
            cent = residual[pick] + 1e-3 * torch.randn(bins, residual.shape[1], generator=generator)
            for _ in range(iters):
                idx = torch.cdist(residual, cent).argmin(dim=1)
                counts = torch.bincount(idx, minlength=bins).float()
                sums = torch.zeros_like(cent).index_add_(0, idx, residual)
                cent = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], cent)
            idx = torch.cdist(residual, cent).argmin(dim=1)
            self.embed[k] = cent
            self.embed_avg[k] = cent
            self.cluster_size[k] = torch.bincount(idx, minlength=bins).float().clamp(min=1.0)
            residual = residual - cent[idx]
        self.inited.fill_(True)

    def forward(self, z: torch.Tensor, update: bool, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, D, T] -> (zq straight-through [B, D, T], codes [B, K, T], commitment loss)."""
        b, d, t = z.shape
        x = z.transpose(1, 2).reshape(b * t, d)  # [M, D]
        residual, qsum = x, torch.zeros_like(x)
        commit = z.new_zeros(())
        codes = []
        for k in range(self.embed.shape[0]):
            e = self.embed[k]  # [bins, D]
            r = residual.detach()
            idx = (r.pow(2).sum(1, keepdim=True) - 2 * r @ e.t() + e.pow(2).sum(1)[None]).argmin(dim=1)  # [M]
            q = e[idx]
            commit = commit + F.mse_loss(residual, q.detach())
            if update:
                self._ema(k, r, idx, generator)
            residual = residual - q.detach()
            qsum = qsum + q.detach()
            codes.append(idx.view(b, t))
        zq = x + (qsum - x).detach()  # straight-through: decoder sees the quantised latent, grads go to the encoder
        return zq.view(b, t, d).transpose(1, 2), torch.stack(codes, 1), commit

    @torch.no_grad()
    def _ema(self, k: int, x: torch.Tensor, idx: torch.Tensor, generator: torch.Generator | None) -> None:
        bins = self.embed.shape[1]
        counts = torch.bincount(idx, minlength=bins).float()
        sums = torch.zeros_like(self.embed_avg[k]).index_add_(0, idx, x)
        self.cluster_size[k].mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg[k].mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size[k].sum()
        size = (self.cluster_size[k] + self.eps) / (n + bins * self.eps) * n  # Laplace smoothing
        self.embed[k] = self.embed_avg[k] / size[:, None]
        dead = self.cluster_size[k] < self.dead
        n_dead = int(dead.sum())
        if n_dead:  # re-seed unused codes with random current residuals
            pick = x[torch.randint(x.shape[0], (n_dead,), generator=generator)]
            self.embed[k][dead] = pick
            self.embed_avg[k][dead] = pick
            self.cluster_size[k][dead] = 1.0


# --------------------------------------------------------------------------------------------------- losses


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int) -> torch.Tensor:
    """HTK mel triangles [n_mels, n_fft // 2 + 1]."""
    def hz2mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel2hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    pts = mel2hz(np.linspace(hz2mel(np.array(0.0)), hz2mel(np.array(sample_rate / 2)), n_mels + 2))
    fb = np.zeros((n_mels, len(freqs)), dtype=np.float32)
    for i in range(n_mels):
        lo, c, hi = pts[i], pts[i + 1], pts[i + 2]
        fb[i] = np.maximum(0, np.minimum((freqs - lo) / max(c - lo, 1e-6), (hi - freqs) / max(hi - c, 1e-6)))
    return torch.from_numpy(fb)


class SpectralLosses(nn.Module):
    """Multi-resolution STFT distance and log-mel L1 between waveforms [B, S]."""

    def __init__(self, sample_rate: int, scales: tuple[int, ...] = SCALES, n_mels: int = 64) -> None:
        super().__init__()
        self.scales = scales
        for n in scales:
            self.register_buffer(f"win{n}", torch.hann_window(n), persistent=False)
        self.register_buffer("mel", mel_filterbank(1024, n_mels, sample_rate), persistent=False)

    def _mag(self, x: torch.Tensor, n: int) -> torch.Tensor:  # [B, S] -> [B, F, frames]
        spec = torch.stft(x, n, n // 4, window=getattr(self, f"win{n}"), return_complex=True)
        return spec.abs().clamp(min=1e-7)

    def mrstft(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Σ over scales of spectral convergence + log-magnitude L1, averaged."""
        total = x.new_zeros(())
        for n in self.scales:
            mx, my = self._mag(x, n), self._mag(y, n)
            sc = torch.linalg.norm(my - mx, dim=(1, 2)) / torch.linalg.norm(my, dim=(1, 2)).clamp(min=1e-5)
            total = total + sc.mean() + (mx.log() - my.log()).abs().mean()
        return total / len(self.scales)

    def mel_l1(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L1 between log10 mel spectrograms (n_fft 1024)."""
        mx = (self.mel @ self._mag(x, 1024)).clamp(min=1e-5).log10()
        my = (self.mel @ self._mag(y, 1024)).clamp(min=1e-5).log10()
        return (mx - my).abs().mean()


def si_snr(est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Scale-invariant SNR in dB per row; est, ref [B, S]."""
    est = est - est.mean(-1, keepdim=True)
    ref = ref - ref.mean(-1, keepdim=True)
    proj = (est * ref).sum(-1, keepdim=True) / ref.pow(2).sum(-1, keepdim=True).clamp(min=1e-8) * ref
    noise = est - proj
    return 10 * torch.log10(proj.pow(2).sum(-1).clamp(min=1e-8) / noise.pow(2).sum(-1).clamp(min=1e-8))


# ---------------------------------------------------------------------------------------------------- train


def _audio(work: Path, split: str, n: int, duration: float, sr: int) -> np.ndarray:
    """Rendered clips [n, duration·sr] float32, cached as float16 in the work folder (render once, even on resume)."""
    path = work / "audio" / f"{split}-{n}-{duration:g}s.npy"
    if path.is_file():
        return np.load(path).astype(np.float32)
    seeds = common.corpus().split_seeds(split, n)
    wav = common.render_clips(seeds, duration, sr)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, wav.astype(np.float16))
    return wav


def train_codec(work: Path, cfg: CodecTrainConfig) -> Encodec:
    """Train (or resume) the codec in `work/codec`; returns it in eval mode with final codebooks."""
    folder = work / "codec"
    common.seed_all(cfg.seed)
    sr = common.corpus().SAMPLE_RATE
    ccfg = codec_config(cfg.n_filters, cfg.dimension, cfg.bins, sample_rate=sr)
    codec = Encodec(ccfg)
    vq = RVQTrainer(codec.quantizer.embed, decay=cfg.ema_decay)
    losses = SpectralLosses(sr)
    params = list(codec.encoder.parameters()) + list(codec.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.5, 0.9), weight_decay=0.0)
    start = 0
    got = common.load_checkpoint(folder, "ckpt", opt)
    if got is not None:
        tensors, meta = got
        codec.load_state_dict({k[len("codec."):]: v for k, v in tensors.items() if k.startswith("codec.")})
        for k, v in vq.state().items():
            v.copy_(tensors[f"vq.{k}"])
        start = int(meta["step"])
    if start >= cfg.steps:
        return codec.eval()
    audio = torch.from_numpy(_audio(work, "train", cfg.n_clips, cfg.clip_duration, sr))  # [N, S]
    crop = int(cfg.crop * sr)
    crop -= crop % ccfg.hop_length
    bank: list[torch.Tensor] = []  # encoder outputs of the steps just before vq_start (k-means data)
    codec.train()
    bar = common.progress(cfg.steps, start, "codec")
    timer = common.Timer()
    for step in range(start, cfg.steps):
        g = common.step_generator(cfg.seed, step)
        rows = torch.randint(audio.shape[0], (cfg.batch,), generator=g)
        offs = torch.randint(audio.shape[1] - crop + 1, (cfg.batch,), generator=g)
        x = torch.stack([audio[r, o:o + crop] for r, o in zip(rows.tolist(), offs.tolist())])  # [B, S]
        x = x * (0.5 + 0.5 * torch.rand(cfg.batch, 1, generator=g))  # gain augmentation
        for group in opt.param_groups:
            group["lr"] = common.cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup)
        z = codec.encoder(x[:, None])  # [B, D, T]
        if step >= cfg.vq_start and not bool(vq.inited):
            vq.kmeans_init(torch.cat(bank) if bank else z.detach().transpose(1, 2).reshape(-1, z.shape[1]),
                           generator=g)
            bank.clear()
        if bool(vq.inited):
            zq, _, commit = vq(z, update=True, generator=g)
        else:
            zq, commit = z, z.new_zeros(())
            if step >= cfg.vq_start - 20:
                bank.append(z.detach().transpose(1, 2).reshape(-1, z.shape[1]))
        y = codec.decoder(zq)[:, 0]  # [B, S]
        l1 = (y - x).abs().mean()
        mr = losses.mrstft(y, x)
        mel = losses.mel_l1(y, x)
        loss = cfg.w_l1 * l1 + cfg.w_mrstft * mr + cfg.w_mel * mel + cfg.commit * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            rec = {"step": step, "loss": loss.item(), "l1": l1.item(), "mrstft": mr.item(), "mel": mel.item(),
                   "commit": float(commit.detach()), "lr": opt.param_groups[0]["lr"], "min": round(timer.minutes, 2)}
            bar.set_postfix(loss=f"{rec['loss']:.3f}", mel=f"{rec['mel']:.3f}")
            common.append_log(folder, rec)
        out_of_time = cfg.max_minutes > 0 and timer.minutes > cfg.max_minutes
        if (step + 1) % cfg.save_every == 0 or step == cfg.steps - 1 or out_of_time:
            _save(folder, codec, vq, opt, step + 1, cfg)
        if out_of_time:
            break
    bar.close()
    return codec.eval()


def _save(folder: Path, codec: Encodec, vq: RVQTrainer, opt: torch.optim.Optimizer, step: int,
          cfg: CodecTrainConfig) -> None:
    tensors = {f"codec.{k}": v for k, v in codec.state_dict().items()}
    tensors.update({f"vq.{k}": v.float() if v.dtype == torch.bool else v for k, v in vq.state().items()})
    tensors["vq.inited"] = vq.inited.to(torch.uint8)
    common.save_checkpoint(folder, "ckpt", tensors, opt, {"step": step, "config": asdict(cfg),
                                                          "codec": asdict(codec.config)})


def load_trained_codec(work: Path) -> Encodec:
    """The codec of `work/codec/ckpt` (config from its JSON), eval mode."""
    got = common.load_checkpoint(work / "codec", "ckpt")
    if got is None:
        raise ValueError(f"no codec checkpoint in {work / 'codec'}: run "
                         f"`python -m magnet_engine.train codec --work {work}` first")
    tensors, meta = got
    codec = Encodec(CodecConfig.from_dict(meta["codec"]))
    codec.load_state_dict({k[len("codec."):]: v for k, v in tensors.items() if k.startswith("codec.")})
    return codec.eval()


@torch.no_grad()
def evaluate_codec(work: Path, codec: Encodec, n_valid: int = 16, duration: float = 10.0) -> dict[str, Any]:
    """Reconstruction of held-out `valid` clips (full length, through the engine's encode/decode):
    SI-SNR (dB, higher is better), log-mel L1 and multi-res STFT distance (lower is better), codebook usage."""
    sr = codec.sample_rate
    audio = torch.from_numpy(_audio(work, "valid", n_valid, duration, sr))
    losses = SpectralLosses(sr)
    stats: dict[str, list[float]] = {"si_snr_db": [], "mel_l1": [], "mrstft": []}
    usage = torch.zeros(codec.config.n_q, codec.config.bins)
    for sl in common.batches(audio.shape[0], 4):
        x = audio[sl]
        codes = codec.encode(x[:, None])
        y = codec.decode(codes)[:, 0, : x.shape[1]]
        stats["si_snr_db"] += si_snr(y, x).tolist()
        for i in range(x.shape[0]):
            stats["mel_l1"].append(losses.mel_l1(y[i:i + 1], x[i:i + 1]).item())
            stats["mrstft"].append(losses.mrstft(y[i:i + 1], x[i:i + 1]).item())
        for k in range(codes.shape[1]):
            usage[k] += torch.bincount(codes[:, k].flatten(), minlength=codec.config.bins).float()
    p = usage / usage.sum(1, keepdim=True)
    perplexity = torch.exp(-(p * p.clamp(min=1e-12).log()).sum(1))
    out = {k: float(np.mean(v)) for k, v in stats.items()}
    out["codebook_perplexity"] = [round(float(v), 1) for v in perplexity]
    out["n_clips"] = int(audio.shape[0])
    (work / "codec").mkdir(parents=True, exist_ok=True)
    (work / "codec" / "eval.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


# ----------------------------------------------------------------------------------------------- tokenise


@dataclass
class TokensConfig:
    n_train: int = 1200
    n_valid: int = 64
    duration: float = 10.0
    captions: int = 3  # caption variants per clip (the corpus draws wording at random)
    chunk: int = 16
    text_encoder: str = common.TEXT_ENCODER


@torch.no_grad()
def tokenise(work: Path, cfg: TokensConfig) -> None:
    """Render + encode every LM clip once -> tokens/{split}.npy [N, K, T] int16 and {split}.json (seeds, captions);
    text states of every caption -> tokens/text.safetensors. Skips splits already done (resumable)."""
    codec = load_trained_codec(work)
    folder = work / "tokens"
    folder.mkdir(parents=True, exist_ok=True)
    c = common.corpus()
    texts: list[str] = []
    for split, n in (("train", cfg.n_train), ("valid", cfg.n_valid)):
        meta_path = folder / f"{split}.json"
        if meta_path.is_file() and (folder / f"{split}.npy").is_file():
            meta = json.loads(meta_path.read_text())
            if meta["n"] == n and meta["duration"] == cfg.duration:
                texts += [t for caps in meta["captions"] for t in caps]
                continue
        seeds = c.split_seeds(split, n)
        t = int(round(cfg.duration * codec.frame_rate))
        codes = np.zeros((n, codec.config.n_q, t), dtype=np.int16)
        partial = folder / f".{split}.partial.npy"  # resume inside a split, chunk by chunk
        done = 0
        if partial.is_file():
            saved = np.load(partial)
            done = int((saved.reshape(n, -1) >= 0).all(1).sum()) if saved.shape == codes.shape else 0
            codes[:done] = saved[:done]
        audio = _audio(work, split, n, cfg.duration, codec.sample_rate)  # [N, S], rendered once and cached
        bar = common.progress(n, done, f"tokens/{split}")
        for i in range(done, n, cfg.chunk):
            sl = slice(i, min(n, i + cfg.chunk))
            wav = torch.from_numpy(audio[sl])
            codes[sl] = codec.encode(wav[:, None])[..., :t].numpy().astype(np.int16)
            np.save(partial, np.where(np.arange(n)[:, None, None] < sl.stop, codes, -1).astype(np.int16))
            bar.update(sl.stop - sl.start)
        bar.close()
        caps = common.captions_for(seeds, cfg.captions)
        np.save(folder / f"{split}.npy", codes)
        meta_path.write_text(json.dumps({"n": n, "duration": cfg.duration, "seeds": seeds, "captions": caps}) + "\n")
        partial.unlink(missing_ok=True)
        texts += [t for cs in caps for t in cs]
    bank_path = folder / "text.safetensors"
    if bank_path.is_file():
        bank = common.TextBank.load(bank_path)
        if set(texts) <= set(bank.index):
            return
    tok, enc = common.load_frozen_text_encoder(cfg.text_encoder)
    common.TextBank.build(tok, enc, texts).save(bank_path)
