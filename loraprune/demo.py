"""``python -m loraprune.demo``: the main job (the program lives in :mod:`loraprune.apps.demo`)."""
import sys

from .apps.demo import main, run

__all__ = ["main", "run"]

if __name__ == "__main__":
    sys.exit(run())
