"""`magnet generate` end to end and its bad-input contract: one line on stderr, non-zero exit, no file left."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import run_settings
from magnet_engine.engine.cli import main

FLAGS = {"steps": "--steps", "top_k": "--top-k", "top_p": "--top-p", "temperature": "--temperature",
         "span_arrangement": "--span-arrangement", "span_scoring": "--span-scoring", "duration": "--duration"}


def cli_args(kw: dict) -> list[str]:
    args = ["--greedy"] if kw["greedy"] else []
    if not kw["anneal_temp"]:
        args.append("--no-anneal-temp")
    args += ["--cfg", ",".join(map(str, kw["cfg"]))]
    for name, flag in FLAGS.items():
        v = kw[name]
        args += [flag, ",".join(map(str, v)) if isinstance(v, tuple) else str(v)]
    return args


@pytest.mark.parametrize("run", ["gen_nonoverlap_max", "gen_stride1", "gen_nonoverlap_prod", "gen_cfg3_temp1",
                                 "gen_continuation"])
def test_cli_token_exact(fixture_dir, settings, expected, tmp_path, run):
    tokens = tmp_path / "tokens.npy"
    extra = []
    if run == "gen_continuation":
        np.save(tmp_path / "prompt.npy", expected["prompt_codes"])
        extra = ["--prompt-codes", str(tmp_path / "prompt.npy")]
    rc = main(["generate", *settings["prompts"], "--model", str(fixture_dir), "--device", "cpu", "-o",
               str(tmp_path / "out"), "--tokens-out", str(tokens), "--quiet", *extra,
               *cli_args(run_settings(settings, run))])
    assert rc == 0
    np.testing.assert_array_equal(np.load(tokens), expected[run])
    for i in range(2):
        data, sr = sf.read(tmp_path / "out" / f"{i}.wav")
        assert sr == 32000 and len(data) == expected[run].shape[-1] * 640
        assert np.abs(data).max() <= 1.0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.wav", "1.wav"], "no temporary files left"


def test_cli_engine_flags_take_effect(fixture_dir, tmp_path, monkeypatch):
    """--no-deterministic, --dtype and --batch-size reach what they set: the engine `magnet generate` loads is
    plain (deterministic is the CPU's default) with a bf16 LM, 3 prompts run as batches of 2 and 1, and the tokens
    are that engine's for the whole request (prompt b draws from seed + b either way)."""
    from magnet_engine.engine import api, backends

    loaded: list[api.Engine] = []
    batches: list[int] = []
    load, stream = backends.load, api.Engine.generate_stream
    monkeypatch.setattr(backends, "load", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    monkeypatch.setattr(api.Engine, "generate_stream",
                        lambda self, req, **k: batches.append(req.batch) or stream(self, req, **k))
    tokens = tmp_path / "t.npy"
    rc = main(["generate", *["a piano"] * 3, "--model", str(fixture_dir), "--device", "cpu", "--no-deterministic",
               "--dtype", "bfloat16", "--batch-size", "2", "--seed", "11", "--steps", "2,1,1,1", "--duration", "0.4",
               "-o", str(tmp_path / "out"), "--tokens-out", str(tokens), "--quiet"])
    assert rc == 0
    (eng,) = loaded
    assert not eng.deterministic and eng.lm.dtype == torch.bfloat16
    assert batches == [2, 1]
    want = eng.generate(["a piano"] * 3, seed=11, steps=(2, 1, 1, 1), duration=0.4, decode=False).codes
    np.testing.assert_array_equal(np.load(tokens), want.numpy())


def test_cli_single_file_and_float_wav(fixture_dir, tmp_path):
    out = tmp_path / "one.wav"
    rc = main(["generate", "a fast techno beat", "--model", str(fixture_dir), "--device", "cpu", "-o", str(out),
               "--wav-subtype", "float32", "--normalize", "loudness", "--seed", "1", "--quiet"])
    assert rc == 0
    info = sf.info(out)
    assert info.subtype == "FLOAT" and info.samplerate == 32000 and info.frames == 48 * 640


def test_cli_prompt_audio(fixture_dir, expected, tmp_path):
    wav = tmp_path / "prompt.wav"
    sf.write(wav, expected["encode_wav"][0, 0], 32000, subtype="FLOAT")
    tokens = tmp_path / "t.npy"
    rc = main(["generate", "x", "--model", str(fixture_dir), "--device", "cpu", "-o", str(tmp_path / "o.wav"),
               "--prompt-audio", str(wav), "--greedy", "--steps", "2,1,1,1", "--tokens-out", str(tokens),
               "--quiet"])
    assert rc == 0
    np.testing.assert_array_equal(np.load(tokens)[..., :10], expected["encode_codes"])


def _bad_package(tmp_path: Path, fixture_dir: Path, kind: str) -> Path:
    folder = tmp_path / kind
    folder.mkdir()
    shutil.copy(fixture_dir / "compression_state_dict.bin", folder)
    shutil.copytree(fixture_dir / "t5", folder / "t5")
    lm = folder / "state_dict.bin"
    if kind == "truncated":
        lm.write_bytes((fixture_dir / "state_dict.bin").read_bytes()[:100_000])
    elif kind == "evil":
        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {folder / 'pwned'}",))
        with open(lm, "wb") as f:
            pickle.dump({"best_state": Evil(), "xp.cfg": ""}, f)
    return folder


@pytest.mark.parametrize("argv, code, match", [
    ([], 2, "no prompt"),
    (["x", "--steps", "0,1,1,1"], 2, "positive"),
    (["x", "--steps", "4,2,2"], 2, "needs 4 values"),
    (["x", "--top-p", "1.5"], 2, "top-p"),
    (["x", "--top-k", "5000"], 2, "top-k"),
    (["x", "--temperature", "-1"], 2, "temperature"),
    (["x", "--duration", "5", "--context", "1"], 2, "--context 1s must be shorter"),
    (["x", "--span-arrangement", "zigzag"], 2, "invalid choice"),
    (["x", "--steps", "a,b"], 2, "integers"),
    (["x", "--unconditional", "2"], 2, "not both"),
    (["x", "--batch-size", "0"], 2, "--batch-size must be positive, got 0"),
    (["x", "--batch-size", "-1"], 2, "--batch-size must be positive, got -1"),
    (["x", "--cuda-graph"], 2, "--cuda-graph captures CUDA graphs: it needs the torch or triton backend on a CUDA "
                               "device, not the torch backend on cpu"),
])
def test_cli_usage_errors(fixture_dir, tmp_path, capsys, argv, code, match):
    out = tmp_path / "o.wav"
    rc = main(["generate", *argv, "--model", str(fixture_dir), "--device", "cpu", "-o", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == code
    assert match in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("kind, match", [("truncated", "truncated"), ("evil", "refusing"), ("missing", "not found")])
def test_cli_bad_models(fixture_dir, tmp_path, capsys, kind, match):
    model = tmp_path / "nowhere" if kind == "missing" else _bad_package(tmp_path, fixture_dir, kind)
    out = tmp_path / "o.wav"
    rc = main(["generate", "x", "--model", str(model), "--device", "cpu", "-o", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and match in err and err.count("\n") == 1
    assert not out.exists()
    assert not (model / "pwned").exists(), "the pickle's code must never run"


def test_cli_bad_prompt_codes(fixture_dir, tmp_path, capsys):
    np.save(tmp_path / "p.npy", np.full((1, 4, 5), 4096, dtype=np.int64))
    out = tmp_path / "o.wav"
    rc = main(["generate", "x", "--model", str(fixture_dir), "--device", "cpu", "-o", str(out),
               "--prompt-codes", str(tmp_path / "p.npy"), "--quiet"])
    assert rc == 2 and "[0, 2048)" in capsys.readouterr().err and not out.exists()


def test_cli_unwritable_output_checked_first(tmp_path, capsys):
    # no --model: the output check must fail before any model is looked for
    rc = main(["generate", "x", "-o", str(tmp_path / "missing-dir" / "o.wav")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_console_script_runs(fixture_dir, tmp_path):
    """The installed `magnet` entry point (`python -m magnet_engine.engine.cli`) exits 2 with one line on bad usage."""
    proc = subprocess.run([sys.executable, "-m", "magnet_engine.engine.cli", "generate", "--model", str(fixture_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no prompt" in proc.stderr


def test_unconditional_cli(fixture_dir, tmp_path):
    tokens = tmp_path / "t.npy"
    rc = main(["generate", "--unconditional", "2", "--model", str(fixture_dir), "--device", "cpu", "-o",
               str(tmp_path / "u"), "--greedy", "--steps", "2,1,1,1", "--tokens-out", str(tokens), "--quiet"])
    assert rc == 0 and np.load(tokens).shape == (2, 4, 48)
    assert torch.equal(torch.from_numpy(np.load(tokens)[0]), torch.from_numpy(np.load(tokens)[1]))


# Spellings other tools use for the options in SPELLING: none may appear, so a user's habit fails loudly everywhere
# or works everywhere.
VARIANTS = {"output": {"--outdir", "--out-dir", "--output-dir", "--out-file", "--output-file"},
            "model": {"-m", "--model-dir", "--model-path", "--checkpoint"},
            "seed": {"-s", "--random-seed", "--rng-seed"},
            "device": {"-d", "--dev"},
            "dtype": {"--precision", "--torch-dtype"}}


def _help_options(text: str) -> list[tuple[str, ...]]:
    """The option strings of each option argparse lists in a --help (`  -o OUT, --out OUT  help` -> ('-o', '--out'))."""
    import re

    out = []
    for line in text.splitlines():
        m = re.match(r"^  (-[^ ].*?)(?:  |$)", line)
        if m:
            out.append(tuple(part.split()[0] for part in m.group(1).split(", ")))
    return out


def _every_help(capsys) -> dict[str, str]:
    """`magnet <command> --help` for every command (plug-ins included) and every bench subcommand's --help."""
    from magnet_engine.bench.__main__ import SUBCOMMANDS
    from magnet_engine.bench.__main__ import main as bench
    from magnet_engine.engine import cli

    helps = {}
    commands = ["generate", "export", *cli._plugin_commands()]
    for name, run in [(f"magnet {c}", lambda c=c: cli.main([c, "--help"])) for c in commands] + \
            [(f"bench {b}", lambda b=b: bench([b, "--help"])) for b in SUBCOMMANDS]:
        try:
            code = run()
        except SystemExit as e:
            code = e.code
        assert code in (0, None), name
        helps[name] = capsys.readouterr().out
    return helps


def test_one_flag_vocabulary_over_every_help(capsys):
    """Wherever a subcommand has an output file/folder, a model, a seed, a device or a dtype, it is spelled as
    engine.cli.SPELLING says (`-o/--out` for `magnet export` as for `magnet generate`), and no other tool's variant
    of those spellings appears."""
    from magnet_engine.engine.cli import SPELLING

    helps = _every_help(capsys)
    assert {"magnet generate", "magnet export", "magnet serve", "bench load"} <= set(helps)
    wrong = []
    for name, text in helps.items():
        options = _help_options(text)
        assert options, name  # the help rendered and was parsed
        for opts in options:
            for concept, spelled in SPELLING.items():
                if set(opts) & (set(spelled) | VARIANTS[concept]) and opts != spelled:
                    wrong.append((name, opts, spelled))
    assert wrong == []
