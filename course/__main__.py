"""The chapters' experiments: ``python -m course balance|gw|testbed|testbed_dirichlet|topp|adaptive|text|compare|modern|balance_scope|numbers|ondemand|ondemand_text --help``."""

from __future__ import annotations

from minimoe.cli import run_commands

# in chapter order
COMMANDS = [
    "course.balance",
    "course.gw",
    "course.testbed",
    "course.topp",
    "course.adaptive",
    "course.text",
    "course.compare",
    "course.modern",
    "course.balance_scope",
    "course.numbers",
    "course.ondemand",
]


def main(argv: list[str] | None = None) -> object:
    return run_commands("python -m course", __doc__, COMMANDS, argv)


if __name__ == "__main__":
    main()
