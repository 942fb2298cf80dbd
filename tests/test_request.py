"""The request path: one validated Request, errors spelled per front end, backends by name, and each everyday
mistake a new user made (issue: "One request path") answered in one line before any model work."""
from __future__ import annotations

import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import FIXTURES_ENV, run_settings
from magnet_engine.engine import backends
from magnet_engine.engine.cli import CLI_NAMES, build_parser, main
from magnet_engine.engine.config import GenerationConfig, SettingError
from magnet_engine.engine.request import Request

import magnet_engine as me

REPO = Path(__file__).resolve().parents[1]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(["generate", *argv])
    return rc, capsys.readouterr().err


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and err.startswith("magnet: error: ") and "Traceback" not in err


# ------------------------------------------------------------------------------------------ the request object


def test_request_built_twice_is_equal(tiny, settings) -> None:
    kw = dict(run_settings(settings, "gen_continuation"), seed=0)  # without one, each request draws its own
    codes = torch.zeros(1, 4, 15, dtype=torch.long)
    a = tiny.request(settings["prompts"], prompt_codes=codes, **kw)
    b = tiny.request(list(settings["prompts"]), prompt_codes=codes.clone(), **kw)
    assert isinstance(a, Request) and a == b
    assert a.prompt_codes.shape == (2, 4, 15), "one prompt item serves every prompt"
    assert a != tiny.request(settings["prompts"], prompt_codes=codes + 1, **kw)
    assert a.gen == GenerationConfig.from_dict({**kw, "steps": list(kw["steps"]), "cfg": list(kw["cfg"])},
                                               tiny.default_generation())


def test_generate_takes_the_request_without_rechecking(tiny, settings, expected) -> None:
    request = tiny.request(settings["prompts"], **run_settings(settings, "gen_nonoverlap_max"))
    out = tiny.generate(request, decode=False)
    np.testing.assert_array_equal(out.codes.numpy(), expected["gen_nonoverlap_max"])
    parts = request.split(1)
    assert [p.prompts for p in parts] == [(p,) for p in settings["prompts"]] and parts[0].gen == request.gen
    assert parts[1].gen.seed == request.gen.seed + 1  # prompt b keeps seed + b
    with pytest.raises(SettingError, match="already holds its settings"):
        tiny.generate(request, greedy=False)


BAD = [  # (GenerationConfig fields, CLI flags): the same mistake through both front ends
    ({"duration": math.nan}, ["--duration", "nan"]),
    ({"duration": math.inf}, ["--duration", "inf"]),
    ({"temperature": math.nan}, ["--temperature", "nan"]),
    ({"top_p": 1.5}, ["--top-p", "1.5"]),
    ({"top_k": 5000}, ["--top-k", "5000"]),
    ({"cfg": (3.0, math.inf)}, ["--cfg", "3,inf"]),
    ({"steps": (4, 0, 2, 2)}, ["--steps", "4,0,2,2"]),
    ({"steps": (4, 2, 2)}, ["--steps", "4,2,2"]),
    ({"seed": -1}, ["--seed", "-1"]),
    ({"duration": 0.0}, ["--duration", "0"]),
    ({"duration": 1e9}, ["--duration", "1e9"]),  # past MAX_DURATION: no plan of millions of windows
    # long-form context: positive, finite, shorter than a window (the 1 s fixture's window is 48 frames = 0.96 s)
    ({"context": 0.0}, ["--context", "0"]),
    ({"context": -1.0}, ["--context", "-1"]),
    ({"context": math.nan}, ["--context", "nan"]),
    ({"context": 1.0}, ["--context", "1"]),
    ({"context": 0.96}, ["--context", "0.96"]),
    ({"context": 0.001}, ["--context", "0.001"]),
    ({"duration": 3.0, "context": 2.0}, ["--duration", "3", "--context", "2"]),
    ({"rescore_weight": 0.3}, ["--rescore-weight", "0.3"]),
]


@pytest.mark.parametrize("fields, flags", BAD)
def test_cli_and_api_refuse_alike(fixture_dir, tiny, tmp_path, capsys, fields, flags) -> None:
    """One check (engine.request) and one message, spelled as each caller wrote it: the field in Python, the flag
    on the command line."""
    with pytest.raises(SettingError) as caught:
        tiny.request(["x"], **fields)
    name = next(reversed(fields))  # the field at fault is the last one given
    assert name in str(caught.value) and caught.value.field == name
    out = tmp_path / "o.wav"
    rc, err = run_cli(["x", "--model", str(fixture_dir), "--device", "cpu", "-o", str(out), "--quiet", *flags],
                      capsys)
    assert rc == 2 and one_line(err) and not out.exists()
    assert err == f"magnet: error: {caught.value.spelled(CLI_NAMES)}\n"
    assert flags[-2] in err


def test_request_rules_state_what_build_request_takes(tiny) -> None:
    """engine.request.request_rules, which the HTTP service's schema is built from, states build_request's checks
    exactly for a request without AR models: at each bound of each field, the bound is taken (or not, when
    excluded) and its nearest neighbour outside is refused, by both."""
    from magnet_engine.engine.request import request_rules

    def edges(rule) -> list:
        if rule.kind == "int":
            return [v for v in (rule.low or 0, (rule.low or 0) - 1, rule.high, None if rule.high is None
                                else rule.high + 1, float(rule.low or 0)) if v is not None]
        out = []
        for bound, outward in ((rule.low, -math.inf), (rule.high, math.inf)):
            if bound is not None:
                out += [bound, math.nextafter(bound, outward), math.nextafter(bound, -outward)]
        return out

    seen = 0
    for name, rule in request_rules(tiny.config).items():
        item = rule.item if rule.kind == "list" else rule
        if item.kind not in ("int", "real"):
            continue
        for v in edges(item):
            value = [v] * len(tiny.defaults.steps) if name == "steps" else [v, 1.0] if name == "cfg" else v
            try:
                rule.check(name, value)
                takes = True
            except SettingError:
                takes = False
            try:
                tiny.request(["x"], **{name: value})
                assert takes, f"{name}={value!r}: build_request takes it, the rule does not"
            except SettingError as e:
                assert not takes, f"{name}={value!r}: the rule takes it, build_request refuses it ({e})"
            seen += 1
    assert seen > 30
    refused = set(GenerationConfig.__dataclass_fields__) - set(request_rules(tiny.config))
    for name in refused:  # the levers' settings need an AR model
        with pytest.raises(SettingError, match=name):
            tiny.request(["x"], **{name: 0.5})


@pytest.mark.parametrize("fields, match", [
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"greedy": 1}, "greedy must be true or false"),
    ({"steps": "20,10"}, "steps must be a list"),
    ({"seed": 1.5}, "seed must be a whole number"),
    ({"no_such": 1}, "unknown setting no_such"),
    ({"context": "5"}, "context must be a number"),
    ({"context": True}, "context must be a number"),
])
def test_api_types_refused(tiny, fields, match) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        tiny.request(["x"], **fields)


def test_nan_refused_everywhere(tiny) -> None:
    for bad in ({"rescore_weight": math.nan}, {"hybrid_prefix": math.inf}, {"ar_cfg": math.nan},
                {"top_p": math.nan}):
        with pytest.raises(SettingError, match="finite"):
            GenerationConfig(**bad)
        with pytest.raises(SettingError, match="finite"):
            GenerationConfig.from_dict(bad)
    with pytest.raises(SettingError, match="NaN"):
        tiny.request(["x"], prompt_audio=torch.full((1, 1, 640), math.nan))


def test_prompts_checked(tiny) -> None:
    with pytest.raises(SettingError, match=r"prompts 2 of 2 is empty.*use None"):
        tiny.request(["x", "  "])
    with pytest.raises(SettingError, match="no prompt given"):
        tiny.request([])
    with pytest.raises(TypeError, match="prompts 1 of 1 must be a text"):
        tiny.request([3])
    assert tiny.request("one").prompts == ("one",) and tiny.request([None]).prompts == (None,)


# ---------------------------------------------------------------------------------------------------- backends


def test_backends_by_name(fixture_dir, settings, expected) -> None:
    assert backends.names()[0] == "torch" and {"triton", "onnx"} <= set(backends.names())
    eng = me.load(fixture_dir, backend="triton", device="cpu")
    assert eng.backend == "triton"
    assert all(layer.self_attn.attend.__module__ == "magnet_engine.kernels.backend" for layer in eng.lm.layers)
    out = eng.generate(settings["prompts"], decode=False, **run_settings(settings, "gen_stride1"))
    np.testing.assert_array_equal(out.codes.numpy(), expected["gen_stride1"])
    with pytest.raises(SettingError, match="unknown backend 'nope': installed are torch"):
        me.load(fixture_dir, backend="nope")
    with pytest.raises(SettingError, match="reads an export folder"):
        me.load(fixture_dir, backend="onnx")


def test_import_engine_pulls_nothing_above_it(fixture_dir) -> None:
    """engine/ depends on nothing above it: importing it and loading the default model import neither the plug-ins
    (export, kernels) nor their runtimes, nor transformers' modelling code (its BERT is engine.bert); a released
    checkpoint's T5 needs transformers (which may import triton itself), still no plug-in."""
    code = ("import sys, magnet_engine as me, magnet_engine.engine.api, magnet_engine.engine.cli\n"
            "magnet_engine.engine.cli.build_parser(); me.load(device='cpu')\n"
            "def above(runtimes): return [m for m in sys.modules if m.split('.')[0] in runtimes or "
            "m.startswith(('magnet_engine.export', 'magnet_engine.kernels'))]\n"
            "assert not above(('onnxruntime', 'triton')), above(('onnxruntime', 'triton'))\n"
            "assert 'transformers.modeling_utils' not in sys.modules\n"
            f"me.load({str(fixture_dir)!r}, device='cpu')\n"
            "assert not above(('onnxruntime',)), above(('onnxruntime',))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_help_and_argument_errors_import_no_torch() -> None:
    code = ("import sys; from magnet_engine.engine.cli import main; rc = main(['generate', '--duration', 'nan', 'x']); "
            "assert rc == 2; assert 'torch' not in sys.modules, 'torch imported'; "
            "import contextlib, io; buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf): main(['generate', '--help'])\n"
            "assert 'torch' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_companion_is_what_the_levers_take(fixture_dir, tiny) -> None:
    mg = me.load(fixture_dir / "musicgen_state_dict.bin", device="cpu")
    comp = mg.companion()
    assert comp.config.kind == "musicgen" and comp.lm is mg.lm
    req = tiny.request(["x"], rescorer=mg, greedy=True, steps=(2, 1, 1, 1), duration=0.5)
    assert req.rescorer == comp
    with pytest.raises(SettingError, match="autoregressive"):
        tiny.companion()


# ------------------------------------------------------------------------------- what a new user stumbled on


def test_output_extension_picks_the_format(fixture_dir, tmp_path, capsys) -> None:
    rc, err = run_cli(["x", "-o", str(tmp_path / "song.mp3")], capsys)
    assert rc == 2 and one_line(err) and ".wav, .flac, .ogg" in err and "song.mp3" in err
    assert list(tmp_path.iterdir()) == [], "no folder song.mp3/ made"
    for ext, fmt in ((".flac", "FLAC"), (".ogg", "OGG")):
        out = tmp_path / f"song{ext}"
        rc, err = run_cli(["x", "--model", str(fixture_dir), "--device", "cpu", "-o", str(out), "--greedy",
                           "--steps", "2,1,1,1", "--quiet"], capsys)
        assert rc == 0, err
        assert sf.info(out).format == fmt and sf.info(out).samplerate == 32000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["song.flac", "song.ogg"], "no temporary files left"


def test_files_take_the_users_umask(fixture_dir, tmp_path, capsys) -> None:
    old = os.umask(0o022)
    try:
        rc, _ = run_cli(["x", "--model", str(fixture_dir), "--device", "cpu", "-o", str(tmp_path / "a.wav"),
                         "--greedy", "--steps", "2,1,1,1", "--quiet"], capsys)
    finally:
        os.umask(old)
    assert rc == 0 and stat.S_IMODE((tmp_path / "a.wav").stat().st_mode) == 0o644


@pytest.mark.parametrize("argv, match", [
    (["x", "--device", "tpu"], "unknown --device 'tpu': use cpu, cuda or cuda:N"),
    (["x", "--device", "meta"], "--device 'meta' is not supported: use cpu, cuda or cuda:N"),
    (["x", "--duration", "nan"], "--duration must be a finite number"),
    ([""], "PROMPT 1 of 1 is empty; write what to generate, or use --unconditional N"),
    (["x", "--prompt-audio", "missing.wav"], "cannot read --prompt-audio missing.wav: no such file"),
    (["x", "-o", "/proc/x.wav"], "cannot write /proc/x.wav"),
    (["--unconditional", "0"], "--unconditional N needs a positive count"),
    (["x", "--tokens-out", "t.txt"], "--tokens-out writes a .npy file"),
])
def test_one_line_errors(fixture_dir, tmp_path, capsys, monkeypatch, argv, match) -> None:
    monkeypatch.chdir(tmp_path)
    rc, err = run_cli([*argv, "--model", str(fixture_dir), "--quiet"], capsys)
    assert rc == 2 and one_line(err) and match in err, err
    assert ".part" not in err and list(tmp_path.iterdir()) == []


def test_output_refused_before_any_model(tmp_path, capsys) -> None:
    """No --model found anywhere: the output check must fail first (nothing loaded, nothing generated)."""
    rc, err = run_cli(["x", "--model", str(tmp_path / "nowhere"), "-o", "/proc/x.wav"], capsys)
    assert rc == 2 and "cannot write /proc/x.wav" in err and one_line(err)


def test_prompt_audio_rate_hint_names_the_models_rate(fixture_dir, tmp_path, capsys) -> None:
    wav = tmp_path / "p.wav"
    sf.write(wav, np.zeros(4410, dtype=np.float32), 44100)
    rc, err = run_cli(["x", "--model", str(fixture_dir), "--device", "cpu", "--prompt-audio", str(wav), "-o",
                       str(tmp_path / "o.wav"), "--quiet"], capsys)
    assert rc == 2 and one_line(err) and "44100 Hz" in err and "-r 32000" in err
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    rc, err = run_cli(["x", "--model", str(fixture_dir), "--prompt-audio", str(bad), "-o", str(tmp_path / "o.wav"),
                       "--quiet"], capsys)
    assert rc == 2 and one_line(err) and "not an audio file" in err


def test_help_says_whose_defaults() -> None:
    text = " ".join(build_parser().format_help().split())
    assert "20,10,10,10 for released MAGNeT, 1,4,4,4 for the shipped default" in text
    assert "3.0 for released MAGNeT, 1.0 for the shipped default" in text
    assert "ONNX export folder" in text


def test_status_line_on_a_slow_load(monkeypatch, capsys) -> None:
    """The status shows once the load has taken a second (the timer's firing stood in for: no sleep that a busy
    machine could outlast), and is erased afterwards; a quick load shows nothing."""
    import threading

    from magnet_engine.engine import cli

    class Tty:
        def __init__(self) -> None:
            self.text = ""

        def isatty(self) -> bool:
            return True

        def write(self, s: str) -> None:
            self.text += s

        def flush(self) -> None:
            pass

    class Fired(threading.Timer):
        """A timer whose interval has already passed when the body runs: it fires on start."""

        def start(self) -> None:
            intervals.append(self.interval)
            self.function()

    intervals: list[float] = []
    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    with monkeypatch.context() as m:
        m.setattr(cli.threading, "Timer", Fired)
        with cli._status("loading x", quiet=False):
            assert tty.text == "magnet: loading x...\r"
    assert intervals == [1.0] and tty.text == "magnet: loading x...\r\r\033[K"
    tty.text = ""
    with cli._status("loading x", quiet=False):
        pass
    assert tty.text == "", "no status for a quick load"


def test_train_writes_the_shipped_models_only_by_name(monkeypatch, tmp_path) -> None:
    import magnet_engine.train.__main__ as train_main

    seen: list[Path] = []
    monkeypatch.setattr(train_main.lm_stage, "export", lambda work, assets: seen.append(assets) or {})
    train_main.main(["export", "--work", str(tmp_path)])
    train_main.main(["export", "--work", str(tmp_path), "--assets", str(tmp_path / "mine")])
    assert seen == [tmp_path / "export", tmp_path / "mine"]


def test_readme_lines_say_what_they_run_and_need() -> None:
    readme = (REPO / "README.md").read_text()
    assert "../shared/fixtures" in readme and FIXTURES_ENV in readme
    bench_line = next(line for line in readme.splitlines() if "bench e2e --model magnet-small" in line)
    assert "random weights" in bench_line


def test_missing_fixture_is_one_message(tmp_path) -> None:
    env = {**os.environ, FIXTURES_ENV: str(tmp_path / "nowhere")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_masking.py"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 4 and "reference fixture is missing" in proc.stdout + proc.stderr
    assert FIXTURES_ENV in proc.stdout + proc.stderr and "Error" not in proc.stdout
