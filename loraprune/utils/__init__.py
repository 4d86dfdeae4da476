"""Small helpers with no knowledge of models: atomic writes, paths, tables."""
