"""python -m hyperfused.train {mnist,charlm,plot} [options]"""
import sys


def main():
    commands = {"mnist": "hyperfused.train.mnist", "charlm": "hyperfused.train.charlm", "plot": "hyperfused.train.plot"}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        raise SystemExit(f"usage: python -m hyperfused.train {{{','.join(commands)}}} [options]  (--help for each)")
    import importlib

    importlib.import_module(commands[sys.argv[1]]).main(sys.argv[2:])


if __name__ == "__main__":
    main()
