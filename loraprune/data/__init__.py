"""Text in, token batches out: files, corpora, windows, batches, the shipped samples."""
