"""Command line: ``python -m minimoe train --help``. (The course's experiments: ``python -m course``.)"""

from __future__ import annotations

from minimoe.cli import run_commands


def main(argv: list[str] | None = None) -> object:
    return run_commands("python -m minimoe", __doc__, ["minimoe.cli"], argv)


if __name__ == "__main__":
    main()
