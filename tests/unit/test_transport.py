"""The agent's HTTP client: idle connections end on the agent's side first."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client_agent.transport import KEEPALIVE_SECONDS, SignedClient
from server.cli.server import SERVER_KEEPALIVE_SECONDS


def test_agent_drops_idle_connections_well_before_the_coordinator_does() -> None:
    # A request written on a connection the coordinator is closing is lost (a
    # masked input was, in the benchmark): the agent must let go first, with a
    # margin for a slow device's clock and scheduling.
    client = SignedClient("http://127.0.0.1:9", "device-1", Ed25519PrivateKey.generate())
    try:
        pool = client._http._transport._pool  # httpx's connection pool (httpcore)
        assert pool._keepalive_expiry == KEEPALIVE_SECONDS
    finally:
        client.close()
    assert KEEPALIVE_SECONDS <= SERVER_KEEPALIVE_SECONDS / 2
