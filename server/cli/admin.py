"""``aicfl admin``: the first admin token and further operator tokens."""

from __future__ import annotations

from pathlib import Path

import typer

from server.console import client
from shared.api_client import CliError

app = typer.Typer(help="Administration.", no_args_is_help=True)


@app.command("bootstrap")
def admin_bootstrap(
    db: str | None = typer.Option(None, "--db", envvar="AICFL_DB"),
    data_dir: Path = typer.Option(Path("aicfl-data"), "--data-dir", envvar="AICFL_DATA_DIR"),
    name: str = typer.Option("admin", "--name"),
) -> None:
    """Print the first admin token (refused once an admin exists). Works on the database directly."""
    from coordinator import auth
    from coordinator.datadir import prepare_data_dir
    from coordinator.errors import CoordinatorError
    from coordinator.store import make_engine, migrate, session_factory, transaction
    from server.settings import ServerSettings

    settings = ServerSettings(db=db, data_dir=data_dir)
    try:
        prepare_data_dir(settings.data_dir)  # the database it makes holds token hashes: 0700, 0600
    except OSError as err:
        raise CliError(f"--data-dir {data_dir}: {err.strerror}") from None
    try:
        engine = make_engine(settings.database_url())
        migrate(engine)
        with transaction(session_factory(engine)) as s:
            token = auth.bootstrap_admin(s, name)
    except CoordinatorError as err:
        raise CliError(err.detail) from None
    except Exception as err:  # noqa: BLE001
        raise CliError(f"cannot open the database: {err}") from None
    print(token)


@app.command("token")
def admin_token(
    name: str = typer.Argument(...), role: str = typer.Option("viewer", "--role", help="admin or viewer")
) -> None:
    """Make another operator token."""
    out = client().json("POST", "/v1/operators", json={"name": name, "role": role})
    print(out["token"])
