"""python -m hyperfused.models: each model's parameter count beside the paper's."""
from . import PAPER_PARAMS, HyperMNISTNet, HyperWRN, count_parameters


def main():
    rows = [("MNIST net, generated conv2 (hypernetwork alone)", count_parameters(HyperMNISTNet().hypernet), 4240),
            ("MNIST net, plain conv2 (its kernel)", HyperMNISTNet(hyper=False).conv2.weight.numel(), 12544)]
    for kind, depth, widen in (("hyper", 40, 1), ("hyper", 40, 2), ("plain", 40, 2)):
        model = HyperWRN(depth, widen, hyper=kind == "hyper")
        rows.append((f"WRN-{depth}-{widen} ({kind})", count_parameters(model), int(PAPER_PARAMS[kind, depth, widen])))
    width = max(len(r[0]) for r in rows)
    print(f"{'model':<{width}}  {'ours':>10}  {'paper':>10}")
    for name, ours, paper in rows:
        print(f"{name:<{width}}  {ours:>10,}  {paper:>10,}")


if __name__ == "__main__":
    main()
