"""The drivers: the LoRAPruner engine, prune(), the Trainer callback, checkpoints, one-shot."""
