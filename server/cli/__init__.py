"""``aicfl``: the operator CLI (typer + rich), one module per command group."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from server.cli.admin import app as admin_app
from server.cli.app import app as apps_app
from server.cli.audit import app as audit_app
from server.cli.cluster import app as cluster_app
from server.cli.data import app as data_app
from server.cli.demo import demo_cmd
from server.cli.devices import app as devices_app
from server.cli.jobs import app as jobs_app
from server.cli.models import app as models_app
from server.cli.rounds import app as rounds_app
from server.cli.server import app as server_app
from server.cli.simulate import simulate_cmd
from server.console import DEFAULT_URL, connection, print_error
from shared.api_client import CliError

app = typer.Typer(help="Operate an aicfl federation.", no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(server_app, name="server")
app.add_typer(admin_app, name="admin")
app.add_typer(apps_app, name="app")
app.add_typer(devices_app, name="devices")
app.add_typer(jobs_app, name="jobs")
app.add_typer(rounds_app, name="rounds")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.add_typer(cluster_app, name="cluster")
app.add_typer(audit_app, name="audit")
app.command("simulate")(simulate_cmd)
app.command("demo")(demo_cmd)


@app.callback()
def _main(
    url: str = typer.Option(DEFAULT_URL, envvar="AICFL_URL", help="Coordinator URL."),
    token: str | None = typer.Option(None, envvar="AICFL_TOKEN", help="Operator token."),
    ca_cert: Path | None = typer.Option(
        None, envvar="AICFL_CA_CERT", help="CA bundle for a TLS coordinator."
    ),
) -> None:
    connection.url, connection.token, connection.ca_cert = url, token, ca_cert


def main() -> None:
    """The ``aicfl`` entry point: an error is one line on stderr and a non-zero exit, never a traceback."""
    try:
        app()
    except CliError as err:
        print_error(str(err))
        sys.exit(err.code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as err:  # a file a command reads or writes
        print_error(f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err))
        sys.exit(1)
    except Exception as err:  # noqa: BLE001 - what no command foresaw is still one line, named by its type
        print_error(f"{type(err).__name__}: {err}")
        sys.exit(1)
