"""Static-hypernetwork section: generating every conv kernel of a model, fused vs a per-tile loop."""
from __future__ import annotations


def run_static_section(device, quick, repeats, warmup):
    return []
