"""Changing the model's shape: progressive cuts during the run and the final compaction."""
