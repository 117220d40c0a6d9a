"""A small forward+backward of every fused GPU path, for compute-sanitizer (memcheck, racecheck, initcheck,
synccheck) to watch: HyperLSTM with layer norm on and off, with and without masks, at an odd size (CUDA: in
each launch shape: four thread groups per row, one, and a cluster of blocks per row), and the static
hypernetwork's kernel generation.

    compute-sanitizer --tool initcheck python -m benchmarks.gpu_smoke --backend cuda
"""
from __future__ import annotations

import argparse
import sys

import torch

import hyperfused

from .hyper_lstm import with_env


def lstm_cases(backend: str) -> None:
    for layer_norm in (True, False):
        for dropout in (0.0, 0.3):
            m = hyperfused.HyperLSTM(5, 37, hyper_size=20, hyper_embed=4, layer_norm=layer_norm,
                                     recurrent_dropout=dropout, backend=backend, device="cuda")
            out, state = m(torch.randn(3, 2, 5, device="cuda"))
            (out.sum() + state.hyper_c.sum()).backward()


def run(backend: str) -> None:
    torch.manual_seed(0)
    lstm_cases(backend)
    if backend == "cuda":  # the other launch shapes: this batch gets four thread groups per row, then one;
        # and one block per row, then a cluster of four (sm_90+; elsewhere the setting changes nothing)
        with_env("HYPERFUSED_CUDA_THREAD_GROUPS", "1", lstm_cases)(backend)
        with_env("HYPERFUSED_CUDA_CLUSTER", "4", lstm_cases)(backend)
    net = hyperfused.StaticHyperNetwork(4, 4, 4, 3, backend=backend, device="cuda")
    convs = [hyperfused.HyperConv2d(8, 8, 3, hypernet=net, device="cuda"),
             hyperfused.HyperConv2d(4, 8, 3, hypernet=net, device="cuda")]
    sum(k.sum() for k in net.generate(convs)).backward()
    torch.cuda.synchronize()
    print(f"gpu_smoke: {backend} ran", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("cuda", "triton"), required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device", file=sys.stderr)
        return 1
    run(args.backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
