"""``aicfl server``: run the coordinator."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import typer

from server.console import connection
from shared.api_client import CliError

app = typer.Typer(help="Run the coordinator.", no_args_is_help=True)

# How long the coordinator keeps an idle connection open. Agents drop theirs
# sooner (client_agent.transport.KEEPALIVE_SECONDS), so neither side sends on a
# connection the other is closing. A held check-in (long poll) is not idle:
# uvicorn arms this timer only once a response is complete, so it never cuts one.
SERVER_KEEPALIVE_SECONDS = 5


@app.command("start")
def server_start(
    db: str | None = typer.Option(
        None, "--db", envvar="AICFL_DB", help="Database URL (default: SQLite under --data-dir)."
    ),
    data_dir: Path = typer.Option(
        Path("aicfl-data"), "--data-dir", envvar="AICFL_DATA_DIR", help="Blobs, keys and the SQLite file."
    ),
    host: str = typer.Option("127.0.0.1", "--host", envvar="AICFL_HOST"),
    port: int = typer.Option(8080, "--port", envvar="AICFL_PORT"),
    tls_cert: Path | None = typer.Option(
        None, "--tls-cert", envvar="AICFL_TLS_CERT", help="PEM certificate; enables HTTPS with --tls-key."
    ),
    tls_key: Path | None = typer.Option(None, "--tls-key", envvar="AICFL_TLS_KEY"),
    signing_key: Path | None = typer.Option(
        None,
        "--signing-key",
        envvar="AICFL_SIGNING_KEY_FILE",
        help="Model-signing key (PEM); replicas must share one.",
    ),
    log_level: str = typer.Option("info", "--log-level", envvar="AICFL_LOG_LEVEL"),
    with_audit_worker: bool = typer.Option(
        False,
        "--with-audit-worker",
        envvar="AICFL_WITH_AUDIT_WORKER",
        help="Also run a SHAP audit worker process beside the server (needs an admin token: AICFL_TOKEN).",
    ),
) -> None:
    """Start the coordinator API (migrations are applied first)."""
    if (tls_cert is None) != (tls_key is None):
        raise CliError("--tls-cert and --tls-key go together")
    for f in (tls_cert, tls_key):
        if f is not None and not f.is_file():
            raise CliError(f"{f}: no such file")
    if tls_cert is not None and tls_key is not None:
        check_tls(tls_cert, tls_key)
    # What the coordinator writes (database, blobs, keys) is its own: no other local user reads it.
    umask = os.umask(0o077)
    try:
        _serve(db, data_dir, host, port, tls_cert, tls_key, signing_key, log_level, with_audit_worker)
    finally:
        os.umask(umask)  # as it was, for a caller that goes on (the CLI's tests run it in-process)


def _serve(
    db: str | None,
    data_dir: Path,
    host: str,
    port: int,
    tls_cert: Path | None,
    tls_key: Path | None,
    signing_key: Path | None,
    log_level: str,
    with_audit_worker: bool,
) -> None:
    import logging

    import uvicorn
    from pydantic import ValidationError

    from server.app import create_app
    from server.gc_tuning import tune_for_serving
    from server.settings import ServerSettings

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = ServerSettings(
            db=db,
            data_dir=data_dir,
            host=host,
            port=port,
            tls_cert=tls_cert,
            tls_key=tls_key,
            signing_key_file=signing_key,
            log_level=log_level,
        )
    except ValidationError as err:  # a bad AICFL_* variable: name it, in one line
        raise CliError(
            "invalid setting: "
            + "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors())
        ) from None
    try:
        application = create_app(settings)
    except Exception as err:  # noqa: BLE001 - a bad URL or unreachable database: one line
        raise CliError(f"cannot start the coordinator: {err}") from None
    worker = _start_audit_worker(host, port, tls_cert is not None) if with_audit_worker else None
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    logging.getLogger("aicfl.server").info(
        "dashboard at %s://%s:%s/ui/ (sign in with an operator token)",
        "https" if tls_cert else "http",
        shown,
        port,
    )
    tune_for_serving()  # after the app is built: its objects are never walked again
    try:
        uvicorn.run(
            application,
            host=host,
            port=port,
            log_level=log_level,
            timeout_keep_alive=SERVER_KEEPALIVE_SECONDS,
            ssl_certfile=str(tls_cert) if tls_cert else None,
            ssl_keyfile=str(tls_key) if tls_key else None,
        )
    except OSError as err:  # what the checks above could not foresee (TLS files changed meanwhile)
        raise CliError(f"cannot serve on {host}:{port}: {err}") from None
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except Exception:  # noqa: BLE001 - it had its chance to finish its audit
                worker.kill()


class _Encrypted(Exception):
    """The key needs a password: uvicorn asks for it when it loads the key."""


def _no_password() -> str:
    raise _Encrypted


def check_tls(cert: Path, key: Path) -> None:
    """Refuse, in one line, a certificate and key that uvicorn would fail on with a traceback."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cert), str(key), password=_no_password)
    except _Encrypted:
        return
    except ssl.SSLError as err:
        if "KEY_VALUES_MISMATCH" in str(err):
            raise CliError(f"--tls-key {key} is not the key of --tls-cert {cert}") from None
        why = f" ({err.reason})" if err.reason else ""
        raise CliError(
            f"--tls-cert {cert} and --tls-key {key} are not a PEM certificate and its key{why}"
        ) from None
    except OSError as err:
        raise CliError(f"cannot read {err.filename or cert}: {err.strerror}") from None


def _start_audit_worker(host: str, port: int, tls: bool) -> subprocess.Popen[bytes]:
    """``aicfl audit worker`` as a child process that talks to this server over its API."""
    token = connection.token or os.environ.get("AICFL_TOKEN")
    if not token:
        raise CliError(
            "--with-audit-worker needs an admin token for the worker (set AICFL_TOKEN or pass --token)"
        )
    connect = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    env = {
        **os.environ,
        "AICFL_URL": f"{'https' if tls else 'http'}://{connect}:{port}",
        "AICFL_TOKEN": token,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "server", "audit", "worker", "--wait-for-server", "60", "--exit-with-parent"],
        env=env,
    )
