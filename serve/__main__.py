"""`python -m magnet_engine.serve`: the same as `magnet serve`."""
import sys

from .cli import main

sys.exit(main())
