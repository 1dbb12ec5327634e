"""Entry point: `python -m app` opens the window; `python -m app COMMAND` is the CLI."""

from __future__ import annotations

import sys

from app.arguments import COMMANDS

CLI_COMMANDS = frozenset(COMMANDS)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in CLI_COMMANDS:
        from app.cli import main as cli_main

        return cli_main(args)
    if args and args[0] == "--self-test":  # Qt-free check of an install (the bundle's smoke test)
        from app.selftest import run_self_test

        return run_self_test(args[1:])
    from app.ui.app import main as gui_main

    return gui_main(args)


if __name__ == "__main__":
    sys.exit(main())
