"""Programs: the command line, the demo, the toy Shakespeare model the demo falls back to."""
