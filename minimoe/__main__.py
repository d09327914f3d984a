"""Command line: ``python -m minimoe <command> --help``."""

from __future__ import annotations

import argparse
import importlib

# one module per command, each with add_parser(subparsers); imported on start
COMMANDS = [
    "minimoe.experiments.train_cli",
    "minimoe.experiments.adaptive",
    "minimoe.experiments.topp",
    "minimoe.experiments.gw",
    "minimoe.experiments.compare",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minimoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
