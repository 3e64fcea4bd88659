"""``aicfl devices``: enrollment tokens, the device list, revocation."""

from __future__ import annotations

import time
from typing import Any

import typer

from server.console import JSON_OPT, client, console, emit_json, fmt
from server.tables import Column, print_table
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


#: A device in the list; its name, chosen at enrollment, wraps.
DEVICE_COLUMNS = (
    Column("id"),
    Column("name", wrap=True),
    Column("online"),
    Column("last seen", priority=1),
    Column("agent", priority=3),
    Column("peak RSS (MB)", priority=4),
    Column("revoked", priority=2),
)


def device_row(d: dict[str, Any], now: float) -> list[str]:
    """A device as the cells of :data:`DEVICE_COLUMNS`, its last check-in counted back from ``now``."""
    return [
        d["id"],
        d["name"],
        "yes" if d["online"] else "no",
        f"{now - d['last_seen']:.0f}s ago" if d["last_seen"] else "never",
        d["agent_version"],
        fmt(d["peak_rss_mb"]),
        str(d["revoked_at"])[:19] if d["revoked_at"] else "-",
    ]


@app.command("list")
def devices_list(as_json: bool = JSON_OPT) -> None:
    rows = client().pages("/v1/devices")
    if as_json:
        return emit_json(rows)
    now = time.time()
    print_table(console, DEVICE_COLUMNS, [device_row(d, now) for d in rows])


@app.command("revoke")
def devices_revoke(device_id: str) -> None:
    """Revoke a device; its requests are refused from now on."""
    d = client().json("POST", f"/v1/devices/{device_id}/revoke")
    print(f"revoked {d['id']}")
