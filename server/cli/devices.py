"""``aicfl devices``: enrollment tokens, the device list, revocation."""

from __future__ import annotations

import time

import typer
from rich.table import Table

from server.console import JSON_OPT, client, console, emit_json, fmt
from shared.api_client import CliError
from shared.jobspec import parse_duration

app = typer.Typer(help="Enrollment tokens and devices.", no_args_is_help=True)


@app.command("token")
def devices_token(
    count: int = typer.Option(1, "--count", min=1, max=10_000),
    ttl: str = typer.Option("1h", "--ttl", help="Lifetime, e.g. 30m, 1h, 7d."),
    as_json: bool = JSON_OPT,
) -> None:
    """One-time enrollment tokens for devices."""
    try:
        seconds = parse_duration(ttl)
    except ValueError as err:
        raise CliError(f"--ttl: {err}") from None
    out = client().json("POST", "/v1/enrollment-tokens", json={"count": count, "ttl_seconds": seconds})
    if as_json:
        emit_json(out)
    else:
        for t in out["tokens"]:
            print(t)


@app.command("list")
def devices_list(as_json: bool = JSON_OPT) -> None:
    rows = client().json("GET", "/v1/devices")
    if as_json:
        return emit_json(rows)
    table = Table("id", "name", "online", "last seen", "agent", "peak RSS (MB)", "revoked")
    now = time.time()
    for d in rows:
        seen = f"{now - d['last_seen']:.0f}s ago" if d["last_seen"] else "never"
        table.add_row(
            d["id"],
            d["name"],
            "yes" if d["online"] else "no",
            seen,
            d["agent_version"],
            fmt(d["peak_rss_mb"]),
            fmt(d["revoked_at"]),
        )
    console.print(table)


@app.command("revoke")
def devices_revoke(device_id: str) -> None:
    """Revoke a device; its requests are refused from now on."""
    d = client().json("POST", f"/v1/devices/{device_id}/revoke")
    print(f"revoked {d['id']}")
