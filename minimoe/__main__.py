"""Command line: ``python -m minimoe train --help``; ``python -m minimoe zoo`` (the router zoo). (The course's experiments: ``python -m course``.)"""

from __future__ import annotations

from minimoe.cli import run_commands


def main(argv: list[str] | None = None) -> object:
    return run_commands("python -m minimoe", __doc__, ["minimoe.cli", "minimoe.zoo_table"], argv)


if __name__ == "__main__":
    main()
