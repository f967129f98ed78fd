"""``python -m fastcdml {info,bench,demo}`` (also installed as the ``fastcdml`` console script)."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

COMMANDS = {
    "info": "which backends this installation has, per loss and device",
    "bench": "time the losses on this device and write bench/results (see `fastcdml bench --help`)",
    "demo": "train a small retrieval model on bundled data with each loss (see `fastcdml demo --help`)",
}


def info() -> int:
    import torch

    import fastcdml
    from fastcdml._backend import load_extension

    ext, reason = load_extension()
    print(f"fastcdml {fastcdml.__version__}  torch {torch.__version__}  cuda available: {torch.cuda.is_available()}")
    print(f"C++ extension: {json.dumps(ext.build_info()) if ext else reason}")
    for key, backends in fastcdml.backends().items():
        print(f"  {key:10s} " + "  ".join(f"{name}: {why}" for name, why in backends.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="fastcdml", description=__doc__)
    parser.add_argument("command", choices=COMMANDS, help="; ".join(f"{k}: {v}" for k, v in COMMANDS.items()))
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "info":
        return info()
    return importlib.import_module(f"fastcdml.{args.command}").main(argv[1:] + rest)


if __name__ == "__main__":
    sys.exit(main())
