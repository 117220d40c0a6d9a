"""Trains the paper's MNIST network with a generated second conv beside the plain one, on the same batches.

    python -m hyperfused.train mnist --epochs 1 --limit 5000
"""
from __future__ import annotations

import argparse
import json

import torch
from torch.nn import functional as F
from tqdm import tqdm

from ..models import HyperMNISTNet, count_parameters
from .data import MissingDataError, load_mnist


@torch.no_grad()
def error_rate(model, x, y, batch=1000) -> float:
    model.eval()
    wrong = sum((model(x[i:i + batch]).argmax(1) != y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    model.train()
    return wrong / len(x)


def train(epochs=1, limit=None, batch_size=100, lr=1e-3, seed=0, backend="auto", log=None, quiet=False):
    torch.manual_seed(seed)
    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = load_mnist()
    if limit:
        x_train, y_train = x_train[:limit], y_train[:limit]
        x_test, y_test = x_test[:max(limit // 5, 1000)], y_test[:max(limit // 5, 1000)]
    models = {"hyper": HyperMNISTNet(hyper=True, backend=backend), "plain": HyperMNISTNet(hyper=False)}
    opts = {k: torch.optim.Adam(m.parameters(), lr=lr) for k, m in models.items()}
    if not quiet:
        for k, m in models.items():
            extra = f" (hypernetwork {count_parameters(m.hypernet):,}; paper: 4,240)" if k == "hyper" else ""
            print(f"{k}: {count_parameters(m):,} parameters{extra}")
    history = []
    steps = epochs * ((len(x_train) + batch_size - 1) // batch_size)
    bar = tqdm(total=steps, desc="mnist", disable=quiet)
    for epoch in range(epochs):
        perm = torch.randperm(len(x_train))
        for i in range(0, len(x_train), batch_size):
            idx = perm[i:i + batch_size]
            losses = {}
            for k, m in models.items():
                loss = F.cross_entropy(m(x_train[idx]), y_train[idx])
                opts[k].zero_grad()
                loss.backward()
                opts[k].step()
                losses[k] = loss.item()
            history.append(losses)
            bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
            bar.update()
    bar.close()
    result = {k: {"test_error": error_rate(m, x_test, y_test), "parameters": count_parameters(m)}
              for k, m in models.items()}
    result["epochs"], result["train_examples"], result["test_examples"] = epochs, len(x_train), len(x_test)
    if log:
        with open(log, "w") as f:
            json.dump({"result": result, "loss": history}, f)
    return result, history


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hyperfused.train mnist", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None, help="train on the first N examples only")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--log", default=None, help="write the result and loss curve as JSON")
    args = ap.parse_args(argv)
    try:
        result, _ = train(args.epochs, args.limit, args.batch_size, args.lr, args.seed, args.backend, args.log)
    except MissingDataError as e:
        raise SystemExit(f"error: {e}")
    for k in ("hyper", "plain"):
        print(f"{k}: test error {100 * result[k]['test_error']:.2f}% on {result['test_examples']} test images "
              f"({result[k]['parameters']:,} parameters)")
    print("paper (full training): hyper 0.76%, plain 0.72%")


if __name__ == "__main__":
    main()
