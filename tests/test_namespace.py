"""One import name: everything installs under `magnet_engine`, and the repository's folders shadow nothing.

The folders (engine/, kernels/, ...) are subpackages of `magnet_engine` (magnet_engine/__init__.py) without an
`__init__.py` of their own: run from the repository root, where `python -m pytest` and `python -m magnet_engine.bench`
put the root first on sys.path, such a folder is only a namespace portion, and a regular package of the same name
(Hugging Face's `kernels`, which transformers imports) still wins (PEP 420).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("engine", "kernels", "export", "bench", "serve", "train")


def _sources() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / f for f in out.split()]


def test_no_bare_import_of_a_folder_name() -> None:
    """Imports are absolute under magnet_engine or relative: `import engine` / `from kernels import ...` would
    resolve to whatever else is installed under that name."""
    bare = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            bare += [f"{path.relative_to(REPO)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in FOLDERS]
    assert not bare, "import these as magnet_engine.<folder>... (or relatively):\n" + "\n".join(bare)


def test_folders_are_namespace_portions() -> None:
    assert not [f for f in FOLDERS if (REPO / f / "__init__.py").exists()]
    assert (REPO / "magnet_engine" / "__init__.py").is_file() and not (REPO / "__init__.py").exists()


def test_repository_root_first_on_the_path_shadows_nothing() -> None:
    """From the root (sys.path[0] = the root, as under `python -m`), each folder name resolves to another
    distribution's regular package when one is installed (Hugging Face's kernels here), else to nothing of ours
    that runs code; and magnet_engine still resolves to this checkout's package."""
    code = ("import importlib.util as u, json, sys\n"
            f"print(json.dumps({{n: getattr(u.find_spec(n), 'origin', None) for n in {FOLDERS!r}}}))\n"
            "import kernels, magnet_engine\n"
            "print(json.dumps([getattr(kernels, '__file__', None), magnet_engine.__file__]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    origins, (kernels_file, package_file) = (json.loads(line) for line in proc.stdout.splitlines()[:2])
    ours = {n: o for n, o in origins.items() if o is not None and Path(o).is_relative_to(REPO)}
    assert not ours, f"these folder names import code from the checkout: {ours}"
    assert kernels_file is not None and not Path(kernels_file).is_relative_to(REPO), kernels_file
    assert Path(package_file).resolve() == REPO / "magnet_engine" / "__init__.py"


def test_top_level_api_without_torch() -> None:
    """`import magnet_engine as me` offers what `engine` did (load, Engine, Scheduler, GenerationConfig, ...),
    loaded on first use: importing the package (the CLI's --help path) imports no torch."""
    code = ("import sys, magnet_engine as me\n"
            "assert 'torch' not in sys.modules, 'import magnet_engine imported torch'\n"
            "assert me.GenerationConfig().steps\n"
            "for name in me.__all__: getattr(me, name)\n"
            "assert me.Scheduler.__module__ == 'magnet_engine.engine.scheduler'\n"
            "assert callable(me.load)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
