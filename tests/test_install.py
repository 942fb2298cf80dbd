"""The built wheel beside Hugging Face's `kernels` and the current transformers, as a user installs it.

The repository is built into a wheel (not editable) and installed with its `triton` and `onnx` extras, `kernels` and
the newest transformers in a fresh virtual environment (no system site packages: the checkout's editable install
must not leak in). Run from a folder outside the checkout, without PYTHONPATH, it must add only `magnet_engine`,
leave `import kernels` to Hugging Face, and reproduce the fixture's tokens through the Triton backend and through
an ONNX export, and the shipped default model must write audio. About five minutes on 2 cores, most of it pip and
the export. A prerequisite that cannot be had (no venv module, no registry) fails the test with the reason: it
never skips.

Also here: `magnet export --text-encoder DIR` hands the folder to the loader (fast, in this environment).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import run_settings
from test_cli import cli_args

ROOT = Path(__file__).resolve().parents[1]
DIST = "magnet-engine"
RUN = "gen_nonoverlap_prod"  # a greedy run whose tokens the Triton backend must reproduce
PIP_TIMEOUT_S = 1200
# The environment a user's shell would give: nothing that points back into this checkout or its environment, and no
# hub access (the fixture and the default model are local; a download attempt must fail, not hang).
DROPPED_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "MAGNET_FIXTURES", "PYTHONSTARTUP")


@dataclass(frozen=True)
class Venv:
    root: Path
    work: Path  # the cwd of every command: outside the checkout
    env: dict[str, str]

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def run(self, *args: str | Path, timeout: float = 900, **env: str) -> subprocess.CompletedProcess[str]:
        """A command of the venv (`magnet`, `python`) in the work folder; fails the test with its output if rc != 0."""
        exe = self.root / "bin" / str(args[0])
        proc = subprocess.run([str(exe), *map(str, args[1:])], cwd=self.work, env={**self.env, **env},
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n"
                        f"{proc.stderr[-4000:]}")
        return proc


def _fail_unless(proc: subprocess.CompletedProcess[str], what: str) -> None:
    if proc.returncode != 0:
        pytest.fail(f"{what} failed (exit {proc.returncode}); this test needs it and does not skip:\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _source_copy(dest: Path) -> Path:
    """The checkout's files as git sees them (tracked, and untracked but not ignored), so that the build reads no
    stray build/ or egg-info of the checkout and writes none into it."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, timeout=60)
    _fail_unless(listed, "listing the checkout's files with git (the wheel is built from them)")
    for name in filter(None, listed.stdout.decode().split("\0")):
        src = ROOT / name
        if src.is_file():  # a file deleted but not yet staged is still listed
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def fixture(fixture_dir: Path) -> Path:
    """The fixture by absolute path: the venv's commands run elsewhere."""
    return fixture_dir.resolve()


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    base = tmp_path_factory.mktemp("install")
    src = _source_copy(base / "src")
    # the build backend of this environment when it has one (no registry needed for it), else pip's isolated build
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-input", *isolation, "-w",
                            str(base / "wheels"), str(src)], capture_output=True, text=True, timeout=600)
    _fail_unless(build, "building the wheel (pip wheel --no-deps)")
    wheels = sorted((base / "wheels").glob("magnet_engine-*.whl"))
    assert len(wheels) == 1, f"expected one magnet_engine wheel, got {wheels}"

    root = base / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", str(root)], capture_output=True, text=True, timeout=300)
    _fail_unless(made, "creating a virtual environment (python -m venv; Debian needs python3-venv)")
    # torch pinned to this environment's release: on CI that is the README's CPU wheel (unpinned, pip would fetch a
    # multi-GB CUDA build); everything else the newest the registry has, all in one resolver run
    torch_pin = "torch==" + importlib.metadata.version("torch").split("+")[0]
    install = subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "--no-input",
                              "--disable-pip-version-check", f"{wheels[0]}[triton,onnx]", torch_pin, "kernels",
                              "transformers"], capture_output=True, text=True, timeout=PIP_TIMEOUT_S,
                             stdin=subprocess.DEVNULL)
    _fail_unless(install, f"pip install of the wheel with kernels, transformers and {torch_pin} into a fresh venv")

    work = base / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    env.update(PATH=f"{root / 'bin'}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return Venv(root, work, env)


def _probe(venv: Venv, code: str) -> dict:
    return json.loads(venv.run("python", "-c", code).stdout.strip().splitlines()[-1])


def _greedy_cli(settings: dict) -> list[str]:
    return [*settings["prompts"], "--device", "cpu", "--quiet", *cli_args(run_settings(settings, RUN))]


def test_one_top_level_package(venv: Venv) -> None:
    """The distribution installs exactly one import package: its top_level.txt and its RECORD agree."""
    got = _probe(venv, (
        "import importlib.metadata as m, json, magnet_engine\n"
        f"d = m.distribution({DIST!r})\n"
        "files = [str(f) for f in d.files]\n"
        "tops = {f.split('/')[0] for f in files if not f.startswith('..') and '.dist-info/' not in f}\n"
        "print(json.dumps({'top_level': (d.read_text('top_level.txt') or '').split(), 'record': sorted(tops),\n"
        "                  'file': magnet_engine.__file__, 'site': str(d.locate_file(''))}))"))
    assert got["top_level"] == ["magnet_engine"], got
    assert got["record"] == ["magnet_engine"], got
    # the installed copy, not the checkout (the cwd is outside it and nothing points back)
    assert Path(got["file"]).is_relative_to(venv.root) and not Path(got["file"]).is_relative_to(ROOT), got


def test_kernels_is_hugging_faces(venv: Venv) -> None:
    """`import kernels` is the `kernels` distribution's (Hugging Face), next to our Triton kernels in one process."""
    got = _probe(venv, (
        "import importlib.metadata as m, json\n"
        "import kernels, transformers, magnet_engine.kernels.backend as ours\n"
        "print(json.dumps({'file': kernels.__file__, 'owners': m.packages_distributions().get('kernels'),\n"
        "                  'hub_api': callable(getattr(kernels, 'get_kernel', None)), 'ours': ours.__name__}))"))
    assert got["owners"] == ["kernels"], got
    assert Path(got["file"]).is_relative_to(venv.root) and got["hub_api"], got
    assert got["ours"] == "magnet_engine.kernels.backend"


def test_triton_backend_reproduces_the_fixture(venv: Venv, fixture: Path, settings: dict, expected: dict) -> None:
    tokens = venv.work / "triton.npy"
    venv.run("magnet", "generate", *_greedy_cli(settings), "--backend", "triton", "--model", fixture,
             "-o", venv.work / "triton", "--tokens-out", tokens, TRITON_INTERPRET="1")
    np.testing.assert_array_equal(np.load(tokens), expected[RUN])


def _without_text_encoder(fixture_dir: Path, dest: Path) -> Path:
    """The fixture's checkpoint without its t5/ folder beside it: only --text-encoder can supply the encoder."""
    dest.mkdir(parents=True)
    for name in ("state_dict.bin", "compression_state_dict.bin"):
        (dest / name).symlink_to(fixture_dir / name)
    return dest


def test_export_reproduces_the_fixture(venv: Venv, fixture: Path, settings: dict, expected: dict) -> None:
    """`magnet export --text-encoder DIR` of the installed package, then `magnet generate --model EXPORT`."""
    model = _without_text_encoder(fixture, venv.work / "bare")
    export = venv.work / "export"
    venv.run("magnet", "export", "--model", model, "--text-encoder", fixture / "t5", "--out", export)
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["source"]["text_encoder"]["source"] == str(fixture / "t5")
    tokens = venv.work / "onnx.npy"
    venv.run("magnet", "generate", *_greedy_cli(settings), "--model", export, "-o", venv.work / "onnx",
             "--tokens-out", tokens)
    np.testing.assert_array_equal(np.load(tokens), expected[RUN])


def test_default_model_writes_audio(venv: Venv) -> None:
    out = venv.work / "default.wav"
    venv.run("magnet", "generate", "a calm ambient pad", "-o", out, "--duration", "2", "--seed", "0", "--quiet")
    import soundfile as sf

    audio, sr = sf.read(out)
    assert np.isfinite(audio).all() and 0 < np.abs(audio).max() <= 1.0
    assert abs(len(audio) / sr - 2.0) < 0.1, (len(audio), sr)  # 2 s, give or take the last frame


def test_export_passes_the_text_encoder(fixture_dir: Path, settings: dict, expected: dict, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`magnet export --text-encoder DIR` loads the model with that encoder (once passed positionally, where `load`
    now takes the backend). The checkpoint has no t5/ beside it, so the load succeeds only with DIR; the loaded
    engine's text embeddings are the reference's. The export stops right after loading (the full export is tested
    above and in test_onnx)."""
    from magnet_engine.engine import backends
    from magnet_engine.engine.cli import main

    model, encoder = _without_text_encoder(fixture_dir, tmp_path / "bare"), fixture_dir / "t5"
    loaded, real_load = [], backends.load

    def load_then_stop(*args: object, **kwargs: object) -> None:
        loaded.append(real_load(*args, **kwargs))
        raise ValueError("stopped after loading")

    monkeypatch.setattr(backends, "load", load_then_stop)
    rc = main(["export", "--model", str(model), "--text-encoder", str(encoder), "--out", str(tmp_path / "x")])
    assert "stopped after loading" in capsys.readouterr().err and rc == 1
    (eng,) = loaded
    cond = eng.text(settings["prompts"] + [None, None])
    np.testing.assert_allclose(cond.numpy(), expected["cond_embeds"], atol=1e-4, rtol=0)
    assert not (tmp_path / "x" / "manifest.json").exists()
