"""fastcdml's command line: ``python -m fastcdml`` (also installed as the ``fastcdml`` console script).

``info`` belongs to the library. ``bench`` and ``demo`` are tools that live beside it in a source checkout
(``bench/`` and ``examples/demo.py``); from a checkout they are delegated there, elsewhere the command says
where to get them.
"""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
TOOLS = {
    "bench": ("time and memory of one training step per implementation and size", CHECKOUT / "bench" / "__main__.py"),
    "demo": ("train a small retrieval model with each loss", CHECKOUT / "examples" / "demo.py"),
}


def info() -> int:
    """Print the versions and, per loss and device, which backends this installation has."""
    import torch

    import fastcdml
    from fastcdml import _extension

    print(f"fastcdml {fastcdml.__version__}  torch {torch.__version__}  cuda available: {torch.cuda.is_available()}")
    print(f"C++ extension: {_extension.describe()}")
    for key, backends in fastcdml.backends().items():
        print(f"  {key:10s} " + "  ".join(f"{name}: {why}" for name, why in backends.items()))
    return 0


def _run_tool(name: str, argv: list[str]) -> int:
    path = TOOLS[name][1]
    if not path.exists():
        print(f"fastcdml {name}: the {name} tool ships with the source checkout, not the installed package; "
              f"run it from a clone of the repository", file=sys.stderr)
        return 2
    sys.argv = [str(path), *argv]
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
    try:
        if name == "bench":
            runpy.run_module("bench", run_name="__main__")
        else:
            runpy.run_path(str(path), run_name="__main__")
    except SystemExit as done:
        return int(done.code or 0)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from fastcdml import __version__

    parser = argparse.ArgumentParser(prog="fastcdml", description="Fused deep-metric-learning losses.")
    parser.add_argument("--version", action="version", version=f"fastcdml {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{info,compile-check,bench,demo}")
    sub.add_parser("info", help="which backends this installation has, per loss and device",
                   description=info.__doc__)
    sub.add_parser("compile-check", help="compile every Triton kernel for sm_90a, sm_80 and sm_86 without a GPU "
                   "(`fastcdml compile-check --help`)", add_help=False)
    for name, (about, _) in TOOLS.items():
        sub.add_parser(name, help=f"{about} (in a source checkout; options: fastcdml {name} --help)",
                       add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return info()
    if args.command == "compile-check":
        from fastcdml.tools.compile_check import main as compile_check

        return compile_check(rest)
    return _run_tool(args.command, rest)


if __name__ == "__main__":
    sys.exit(main())
