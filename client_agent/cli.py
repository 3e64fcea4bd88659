"""``aicfl-agent``: enroll this device, run it, show its status."""

from __future__ import annotations

import json
import logging
import platform
import sys
from pathlib import Path

import httpx
import typer

from client_agent.config import AgentConfig, AgentConfigError, AgentHome
from client_agent.identity import create_identity, public_key_b64
from client_agent.transport import post_enrollment
from shared.api_client import one_line
from shared.tls import verify_setting

app = typer.Typer(help="The aicfl edge agent.", no_args_is_help=True, pretty_exceptions_enable=False)

HOME_OPT = typer.Option(
    None, "--home", envvar="AICFL_AGENT_HOME", help="Agent folder (default ~/.aicfl-agent)."
)


class AgentCliError(Exception):
    pass


_TABLE_SUFFIXES = (".csv", ".parquet", ".pq")


def parse_node_config(text: str) -> dict[str, bool | int | float | str]:
    """``"partition-id=0 num-partitions=4 region='eu'"`` as Flower's ``--node-config`` reads it:
    space-separated ``key=value`` pairs; numbers and ``true``/``false`` typed, quotes stripped."""
    out: dict[str, bool | int | float | str] = {}
    for item in text.split():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise AgentCliError(f"--node-config: {item!r} is not key=value")
        value: bool | int | float | str
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw.strip("'\"")
        out[key] = value
    return out


def _check_data(data: Path) -> None:
    """The data path exists; a table the built-in app reads is checked to parse now, not mid-round."""
    if not data.exists():
        raise AgentCliError(f"--data: {data} does not exist")
    if data.is_file() and data.suffix.lower() in _TABLE_SUFFIXES:
        from shared.tabular import DataSchemaError, load_table

        try:
            load_table(data)
        except DataSchemaError as err:
            raise AgentCliError(f"--data: {err}") from None


@app.command()
def enroll(
    coordinator: str = typer.Option(..., "--coordinator", help="Coordinator URL."),
    token: str = typer.Option(..., "--token", help="One-time enrollment token."),
    data: Path = typer.Option(
        ...,
        "--data",
        help="Local data: a file or folder the job's app reads (CSV or Parquet for the built-in app).",
    ),
    home: Path | None = HOME_OPT,
    name: str = typer.Option("", "--name"),
    threads: int = typer.Option(1, "--threads", min=1, max=256, help="Most CPU threads training may use."),
    ca_cert: Path | None = typer.Option(None, "--ca-cert", help="CA bundle for a TLS coordinator."),
    node_config: str = typer.Option(
        "",
        "--node-config",
        help="What apps may read of this device, as Flower's: 'partition-id=0 num-partitions=4'.",
    ),
) -> None:
    """Make this device's identity key and enroll it with the coordinator."""
    h = AgentHome(home)
    if h.config_path.exists():
        raise AgentCliError(f"{h.root} is already enrolled; use another --home")
    _check_data(data)
    node = parse_node_config(node_config)
    try:
        key = create_identity(h.key_path) if not h.key_path.exists() else None
        if key is None:
            from client_agent.identity import load_identity

            key = load_identity(h.key_path)
    except (OSError, ValueError) as err:  # a home folder we may not write, a damaged key file
        raise AgentCliError(f"--home {h.root}: cannot make or read the identity key: {_why(err)}") from None
    body = {
        "token": token,
        "public_key": public_key_b64(key),
        "name": name or platform.node(),
        "platform": platform.platform(),
    }
    try:
        verify = verify_setting(str(ca_cert) if ca_cert else None)
    except OSError as err:  # ssl.SSLError is one too
        raise AgentCliError(f"--ca-cert {ca_cert}: {_why(err)}") from None
    try:
        resp = post_enrollment(coordinator.rstrip("/") + "/v1/enroll", body, verify=verify)
    except (httpx.HTTPError, httpx.InvalidURL) as err:
        raise AgentCliError(f"cannot reach the coordinator at {coordinator}: {err}") from None
    try:
        out = resp.json()
    except ValueError:
        out = None
    if resp.status_code >= 400:
        detail = out.get("detail") if isinstance(out, dict) else None
        text = one_line(resp)
        raise AgentCliError(
            f"enrollment refused: {detail or text or resp.reason_phrase} (HTTP {resp.status_code})"
        )
    if not isinstance(out, dict) or not {"device_id", "coordinator_public_key"} <= out.keys():
        raise AgentCliError(
            f"{coordinator} answered the enrollment with HTTP {resp.status_code}, not as a coordinator does"
            " (is the URL a coordinator's?)"
        )
    h.save_config(
        AgentConfig(
            coordinator=coordinator,
            device_id=out["device_id"],
            coordinator_public_key=out["coordinator_public_key"],
            data=str(data.resolve()),
            threads=threads,
            ca_cert=str(ca_cert.resolve()) if ca_cert else None,
            name=body["name"],
            node_config=node,
        )
    )
    print(f"enrolled as {out['device_id']}")


@app.command()
def run(
    home: Path | None = HOME_OPT,
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Check in with the coordinator and take part in rounds until stopped (SIGTERM, Ctrl-C)."""
    from client_agent.loop import Agent

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        agent = Agent(AgentHome(home))
    except (AgentConfigError, OSError) as err:
        raise AgentCliError(str(err)) from None
    agent.install_signal_handlers()
    code = agent.run()
    raise typer.Exit(code)


@app.command()
def status(home: Path | None = HOME_OPT, as_json: bool = typer.Option(False, "--json")) -> None:
    """This device's enrollment, data file and last round."""
    h = AgentHome(home)
    try:
        cfg = h.load_config()
    except AgentConfigError as err:
        raise AgentCliError(str(err)) from None
    state = h.load_state()
    reachable: bool | str
    try:
        reachable = (
            httpx.get(
                cfg.coordinator.rstrip("/") + "/v1/health", timeout=5, verify=verify_setting(cfg.ca_cert)
            ).status_code
            == 200
        )
    except httpx.HTTPError as err:
        reachable = f"no ({err})"
    info = {
        "device_id": cfg.device_id,
        "coordinator": cfg.coordinator,
        "coordinator_reachable": reachable,
        "data": cfg.data,
        "data_present": Path(cfg.data).exists(),
        "threads": cfg.threads,
        "last_round_id": state.last_round_id,
        "stages_sent": state.stages_sent,
    }
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:24} {v}")


def _why(err: Exception) -> str:
    return str(getattr(err, "strerror", None) or err)


def main() -> None:
    """The ``aicfl-agent`` entry point: an error is one line on stderr and a non-zero exit, never a traceback."""
    try:
        app()
    except AgentCliError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except OSError as err:  # a file or folder the command reads or writes
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{_why(err)}", file=sys.stderr)
        sys.exit(1)
    except Exception as err:  # noqa: BLE001 - what no command foresaw is still one line, named by its type
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(1)
