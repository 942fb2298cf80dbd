"""The HTTP service on Ray Serve (`magnet serve`) and its client.

`serve.Client(url).generate(prompt, **fields)` -> (audio, sample_rate). Importing `serve` imports neither Ray nor
torch; serve.deployment (Ray) and serve.http (FastAPI, the engine) are imported where used.
"""
from .client import Client, ServiceError

__all__ = ["Client", "ServiceError"]
