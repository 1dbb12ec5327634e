"""``python -m app`` / ``kvchat``: parse options, open the database, show the window."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import platformdirs
from PySide6.QtCore import QSettings
from PySide6.QtGui import QIcon
from PySide6.QtWidgets import QApplication, QMessageBox

import app
from app.arguments import chat_template, commands_epilog, positive_int
from app.domain import KVType
from app.resources import resource_path
from app.storage.store import DatabaseCorrupt, DatabaseInUse, StorageError, set_aside
from app.ui import system_libraries

APP_NAME = "kvchat"
DB_FILE = "chats.db"


def default_db_path() -> Path:
    """chats.db in the per-user data folder (created if missing)."""
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False)) / DB_FILE


def _program_name() -> str:
    """How the user started us: ``python -m app`` or the ``kvchat`` launcher."""
    return "python -m app" if sys.argv[0].endswith("__main__.py") else "kvchat"


def build_parser() -> argparse.ArgumentParser:
    prog = _program_name()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="KV Chat desktop app (python -m app, or kvchat); with a COMMAND, the "
        "command line instead of the window",
        epilog=commands_epilog(prog)
        + f"\n\n{prog} --self-test [--model PATH] checks the install without a window.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--db", help=f"database file (default: {default_db_path()})")
    parser.add_argument("--model", help="GGUF model file (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--n-ctx", type=positive_int, help="context size in tokens")
    parser.add_argument("--kv-type", choices=list(KVType), default=KVType.F16, help="KV cache type")
    parser.add_argument(
        "--chat-template",
        type=chat_template,
        metavar="NAME|FILE",
        help="chat template for the model, kept for it: a llama.cpp built-in name (e.g. gemma), "
        "a Jinja file, or gguf (the GGUF's own); also Model → Chat template…",
    )
    parser.add_argument("--version", action="version", version=f"KV Chat {app.__version__}")
    return parser


def user_settings() -> QSettings:
    """The user's settings (window geometry, generation options, first-run flag)."""
    return QSettings(QSettings.Format.NativeFormat, QSettings.Scope.UserScope, APP_NAME, APP_NAME)


def create_application(
    argv: list[str] | None = None, settings: QSettings | None = None
) -> QApplication:
    """The QApplication with KV Chat's names, icon and style (reused by tests and scripts)."""
    existing = QApplication.instance()
    application = (
        existing if isinstance(existing, QApplication) else QApplication(argv or [sys.argv[0]])
    )
    application.setApplicationName(APP_NAME)
    application.setOrganizationName(APP_NAME)
    application.setApplicationDisplayName("KV Chat")
    application.setApplicationVersion(app.__version__)
    icon = resource_path("icons", "kvchat-256.png")  # optional: shipped by the packaging
    if icon.is_file():
        application.setWindowIcon(QIcon(str(icon)))
    from app.ui import theme  # pyqtgraph: imported once the application exists

    application.setStyle("Fusion")  # the same look, light or dark, on every platform
    settings = user_settings() if settings is None else settings
    theme.apply(str(settings.value("view/theme", theme.ThemeMode.SYSTEM)))
    return application


def main(args: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if args is None else args)
    options = build_parser().parse_args(argv)
    db_path = Path(options.db).expanduser() if options.db else default_db_path()
    if system_libraries.uses_xcb():
        missing = system_libraries.missing_libraries()
        if missing:  # Qt would abort naming one of them at most
            print(system_libraries.missing_message(missing), file=sys.stderr)
            return 1
    application = create_application([sys.argv[0]])
    try:
        db_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        QMessageBox.critical(
            None, "KV Chat", f"Cannot create the data folder {db_path.parent}: {error}"
        )
        return 1

    from app.ui.main_window import MainWindow  # after QApplication: pyqtgraph needs it

    while True:
        try:
            window = MainWindow(
                db_path,
                model_path=options.model,
                settings=user_settings(),
                n_ctx=options.n_ctx,
                kv_type=options.kv_type,
                chat_template=options.chat_template,
            )
            break
        except DatabaseInUse as error:
            QMessageBox.critical(
                None,
                "KV Chat is already open",
                f"{error}.\n\nSwitch to the open window, or start KV Chat with another --db file.",
            )
            return 1
        except DatabaseCorrupt as error:
            if offer_fresh_database(db_path, str(error), _ask_fresh_database) is None:
                return 1
        except StorageError as error:
            QMessageBox.critical(None, "KV Chat cannot open its database", str(error))
            return 1
    window.show()
    return int(application.exec())


def _ask_fresh_database(question: str) -> bool:
    answer = QMessageBox.question(
        None,
        "KV Chat cannot read its database",
        question,
        QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.Cancel,
        QMessageBox.StandardButton.Cancel,
    )
    return answer == QMessageBox.StandardButton.Yes


def offer_fresh_database(db_path: Path, reason: str, ask: Callable[[str], bool]) -> Path | None:
    """Ask to start a fresh database; the unreadable file is renamed, never deleted.

    Returns where the old file now is, or None when the user declines.
    """
    question = (
        f"{reason}\n\nStart with a fresh, empty database? The unreadable file will be kept "
        f"beside it (renamed to {db_path.name}.unreadable-<date>) so nothing is deleted."
    )
    if not ask(question):
        return None
    return set_aside(db_path)
