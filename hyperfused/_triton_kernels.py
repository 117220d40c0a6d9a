"""Imports the Triton kernels as ``hyperfused.triton_kernels``.

They live in the top-level folder ``triton_kernels/`` and never import hyperfused; an installed package maps
that folder to ``hyperfused.triton_kernels`` (pyproject.toml's package-dir), so nothing named
``triton_kernels`` lands at the top level (Triton ships a library of that name, and PyPI has a distribution
of it). In a source checkout, where no such mapping exists, the folder is loaded under that name here.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

NAME = "hyperfused.triton_kernels"


def load():
    """The hyperfused.triton_kernels package (raises ImportError where Triton is missing)."""
    if NAME in sys.modules:
        return sys.modules[NAME]
    try:
        return importlib.import_module(NAME)  # installed layout
    except ModuleNotFoundError as e:
        if e.name != NAME:
            raise
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "triton_kernels")
    spec = importlib.util.spec_from_file_location(NAME, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    if spec is None:
        raise ImportError(f"hyperfused: the Triton kernels are neither installed nor at {folder}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[NAME]
        raise
    import hyperfused
    hyperfused.triton_kernels = module
    return module


def layouts():
    """hyperfused.triton_kernels.layouts, the workspace layouts every backend reads (needs no Triton)."""
    load()
    return importlib.import_module(NAME + ".layouts")
