"""How long the coordinator takes to serve the dashboard's pages for a job of 1,000 rounds, beside the
same pages for a job of 10 rounds, and the API's whole rounds list of the same job as the baseline.

The job's history is written straight into the database (tests/fixtures/history.py: every round with 20
devices, one dropping, central and federated metrics). Each page is served by the coordinator app
in-process (no network: the server's own time, rendering included), on SQLite and, when it is
reachable, on PostgreSQL; the figure is the median of ``--repeat`` requests after one warm-up.

    python bench/dashboard.py [--rounds 1000] [--repeat 30] [--postgres URL]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi.testclient import TestClient  # noqa: E402

from coordinator import auth  # noqa: E402
from server.app import create_app  # noqa: E402
from server.settings import ServerSettings  # noqa: E402
from tests.fixtures.history import seed_job_history  # noqa: E402

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


def median_ms(client: TestClient, path: str, repeat: int, headers: dict[str, str] | None = None) -> float:
    r = client.get(path, headers=headers)
    assert r.status_code == 200, (path, r.status_code, r.text[:300])
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = client.get(path, headers=headers)
        times.append(time.perf_counter() - t0)
        assert r.status_code == 200
    return 1000 * statistics.median(times)


def measure(db: str | None, data_dir: Path, rounds: int, repeat: int) -> list[dict[str, Any]]:
    app = create_app(ServerSettings(data_dir=data_dir, db=db), run_ticker=False)
    fed = app.state.federation
    with fed.write() as s:
        token = auth.bootstrap_admin(s)
        small = seed_job_history(s, rounds=10, name="small")
        large = seed_job_history(s, rounds=rounds, name="large")
    rows = []
    with TestClient(app) as client:
        client.post("/ui/login", data={"token": token})
        bearer = {"Authorization": f"Bearer {token}"}
        for label, path, headers in (
            ("job page", "/ui/jobs/{}", None),
            ("live refresh (every 2 s)", "/ui/jobs/{}/live", None),
            ("curve JSON", "/ui/jobs/{}/curve", None),
            ("API rounds list (baseline)", "/v1/jobs/{}/rounds", bearer),
        ):
            a = median_ms(client, path.format(small), repeat, headers)
            b = median_ms(client, path.format(large), repeat, headers)
            rows.append({"what": label, "small_ms": a, "large_ms": b})
    return rows


def pg_database() -> str | None:
    try:
        import psycopg

        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except Exception:  # noqa: BLE001 - no PostgreSQL here: SQLite only
        return None
    admin.execute('DROP DATABASE IF EXISTS "aicfl_bench_dashboard" WITH (FORCE)')
    admin.execute('CREATE DATABASE "aicfl_bench_dashboard"')
    admin.close()
    return "postgresql+psycopg://postgres@127.0.0.1:5432/aicfl_bench_dashboard"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument(
        "--postgres", default=None, help="a PostgreSQL URL (default: a fresh database on 127.0.0.1)"
    )
    args = p.parse_args()
    dbs: list[tuple[str, str | None]] = [("SQLite", None)]
    pg = args.postgres or pg_database()
    if pg:
        dbs.append(("PostgreSQL", pg))
    print(
        f"dashboard server time, median of {args.repeat} requests (ms): a job of 10 rounds vs {args.rounds}"
    )
    for name, db in dbs:
        with tempfile.TemporaryDirectory() as tmp:
            rows = measure(db, Path(tmp), args.rounds, args.repeat)
        print(f"\n{name}")
        print(f"  {'page':30} {'10 rounds':>10} {str(args.rounds) + ' rounds':>12} {'ratio':>7}")
        for r in rows:
            print(
                f"  {r['what']:30} {r['small_ms']:10.1f} {r['large_ms']:12.1f} {r['large_ms'] / r['small_ms']:7.2f}"
            )


if __name__ == "__main__":
    main()
