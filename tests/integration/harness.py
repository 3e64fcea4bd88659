"""A real coordinator on a free loopback port and real agent processes, for integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server.demo import free_port
from shared.api_client import ApiClient
from shared.datasets import load_dataset
from shared.signing import b64e, public_key_bytes

ENV = {
    **os.environ,
    "PYTHONUNBUFFERED": "1",
    "AICFL_TICK_INTERVAL": "0.1",
    "AICFL_ELIGIBILITY_WINDOW": "4",
    "AICFL_IDLE_RETRY": "0.3",
    "AICFL_ACTIVE_RETRY": "0.2",
    # As an operator of tabular devices would: the built-in app (torch, pandas) imported at start,
    # not inside the first round's stage deadline.
    "AICFL_AGENT_PRELOAD": "shared.apps.tabular:app",
}


def py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def enroll_devices(coord: Coordinator, count: int) -> list[tuple[str, Ed25519PrivateKey]]:
    """``count`` devices enrolled over HTTP, each with its own key: (device id, key)."""
    tokens = coord.api().json("POST", "/v1/enrollment-tokens", json={"count": count})["tokens"]
    out = []
    for token in tokens:
        key = Ed25519PrivateKey.generate()
        resp = httpx.post(
            coord.url + "/v1/enroll", json={"token": token, "public_key": b64e(public_key_bytes(key))}
        )
        assert resp.status_code == 200, resp.text
        out.append((resp.json()["device_id"], key))
    return out


@contextmanager
def running_coordinator(root: Path, settings: dict[str, str]) -> Iterator[Coordinator]:
    """A bootstrapped coordinator started with ``settings`` (``AICFL_*``) on top of ``ENV``; stopped after."""
    saved = dict(ENV)
    ENV.update(settings)
    c = Coordinator(root)
    try:
        c.bootstrap()
        c.start()
        yield c
    finally:
        c.stop()
        ENV.clear()
        ENV.update(saved)


@dataclass
class Coordinator:
    root: Path
    port: int = field(default_factory=free_port)
    db: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    token: str = ""
    agents: list[subprocess.Popen[bytes]] = field(default_factory=list)
    tls: tuple[Path, Path] | None = None  # certificate and key; the certificate is its own CA
    extra: list[str] = field(default_factory=list)  # more `server start` flags

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def verify(self) -> str | bool:
        return str(self.tls[0]) if self.tls else True

    @property
    def data_dir(self) -> Path:
        return self.root / "server"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def _db_args(self) -> list[str]:
        return ["--db", self.db] if self.db else []

    def _tls_args(self) -> list[str]:
        return ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])] if self.tls else []

    def bootstrap(self) -> str:
        out = subprocess.run(
            py("server", "admin", "bootstrap", "--data-dir", str(self.data_dir), *self._db_args()),
            capture_output=True,
            text=True,
            env=ENV,
            check=True,
        )
        self.token = out.stdout.strip()
        return self.token

    def start(self) -> None:
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                py(
                    "server",
                    "server",
                    "start",
                    "--port",
                    str(self.port),
                    "--data-dir",
                    str(self.data_dir),
                    "--log-level",
                    "info",
                    *self._db_args(),
                    *self._tls_args(),
                    *self.extra,
                ),
                stdout=fh,
                stderr=subprocess.STDOUT,
                env={**ENV, "AICFL_TOKEN": self.token},
            )

        def healthy() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                return httpx.get(self.url + "/v1/health", timeout=1, verify=self.verify).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 60, "the coordinator to start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def api(self) -> ApiClient:
        return ApiClient(self.url, self.token, verify=self.verify)

    def enroll(self, data: Path, name: str, extra_args: Sequence[str] = ()) -> Path:
        """Enroll an agent home for ``data``; ``extra_args`` go to ``aicfl-agent enroll`` as they are."""
        token = self.api().json("POST", "/v1/enrollment-tokens", json={"count": 1, "ttl_seconds": 600})[
            "tokens"
        ][0]
        home = self.root / "agents" / name
        out = subprocess.run(
            py(
                "client_agent",
                "enroll",
                "--coordinator",
                self.url,
                "--token",
                token,
                "--data",
                str(data),
                "--home",
                str(home),
                "--name",
                name,
                *(["--ca-cert", str(self.tls[0])] if self.tls else []),
                *extra_args,
            ),
            capture_output=True,
            text=True,
            env=ENV,
        )
        assert out.returncode == 0, out.stderr
        return home

    def run_agent(self, home: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(home.parent / f"{home.name}.log", "ab") as fh:
            proc = subprocess.Popen(
                py("client_agent", "run", "--home", str(home)),
                stdout=fh,
                stderr=subprocess.STDOUT,
                env={**ENV, **(env or {})},
            )
        self.agents.append(proc)
        return proc

    def stop_agents(self) -> None:
        for p in self.agents:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.agents:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()

    def job(self, job_id: int) -> dict[str, Any]:
        return self.api().json("GET", f"/v1/jobs/{job_id}")  # type: ignore[no-any-return]

    def rounds(self, job_id: int) -> list[dict[str, Any]]:
        return self.api().json("GET", f"/v1/jobs/{job_id}/rounds")  # type: ignore[no-any-return]

    def wait_job(self, job_id: int, status: str = "completed", timeout: float = 180) -> dict[str, Any]:
        def ended() -> dict[str, Any] | None:
            j = self.job(job_id)
            return j if j["status"] not in ("running", "pending") else None

        job = wait_for(ended, timeout, f"job {job_id} to end")
        assert job["status"] == status, job
        return job  # type: ignore[no-any-return]


def churn_slices(root: Path, n: int, seed: int = 3) -> tuple[list[Path], Path, dict[str, Any]]:
    """Small natural slices of mlc_churn (by state) for n devices, and a reference file."""
    from shared.datasets import natural_split, test_split

    df, schema, group = load_dataset("mlc_churn")
    df = df.sample(n=1800, random_state=seed)
    train, test = test_split(df, 0.2, seed, stratify_column="churn")
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, part in enumerate(natural_split(train, group, n, seed)):
        p = root / f"device-{i}.csv"
        part.to_csv(p, index=False)
        paths.append(p)
    ref = root / "reference.csv"
    test.to_csv(ref, index=False)
    return paths, ref, schema


def small_spec(
    schema: dict[str, Any],
    *,
    rounds: int,
    target: int,
    minimum: int,
    stage_timeout: float = 20,
    selection_timeout: float = 1.0,
    name: str = "it",
    secure: bool = True,
) -> dict[str, Any]:
    return {
        "name": name,
        "secure": secure,
        "rounds": rounds,
        "seed": 1,
        "data": schema,
        "model": {"zoo": "mlp", "hidden": [16]},
        "cohort": {
            "target": target,
            "minimum": minimum,
            "stage_timeout": stage_timeout,
            "selection_timeout": selection_timeout,
        },
        "training": {"epochs": 1, "batch_size": 64, "learning_rate": 0.01, "optimizer": "adam"},
        "strategy": {"name": "fedavg"},
    }


def drop_column(path: Path, column: str, out: Path) -> Path:
    pd.read_csv(path).drop(columns=[column]).to_csv(out, index=False)
    return out


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, the certificate serving as its own CA."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aicfl test coordinator")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path
