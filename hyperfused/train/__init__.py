"""Training entry points: python -m hyperfused.train {mnist,charlm} --help."""
