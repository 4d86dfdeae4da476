"""``python -m loraprune.demo``: the main job (the program lives in :mod:`loraprune.apps.demo`)."""
from .apps.demo import main

if __name__ == "__main__":
    main()
