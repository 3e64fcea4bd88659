"""``aicfl app new NAME`` writes an app that works: its own tests pass, it loads as its job spec names
it, the spec is valid, a coordinator accepts the job and its reference data, and the package builds
needing only torch and numpy. A bad name or a folder in the way is one error line, and nothing is
written."""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator import registry
from coordinator.blobs import LocalBlobStore
from coordinator.engine import EngineSettings, Federation
from coordinator.errors import Invalid
from coordinator.models import Job, ModelVersion
from coordinator.store import make_engine, migrate, session_factory
from server.cli import main
from server.cli.app import FILES, FIRST_VERSION
from shared.apps import App, AppError, JobContext, load_app
from shared.jobspec import validate_spec

ROOT = Path(__file__).resolve().parents[2]
NAME = "starter_app"  # one name for the module: an imported app stays cached by the coordinator
# Net(features=8, classes=3, hidden=32): 8*32 + 32 + 32*3 + 3
PARAMETERS = 387


@dataclass
class Shown:
    code: int
    out: str
    err: str


def aicfl(*args: str) -> Shown:
    """Run ``aicfl ARGS`` through its entry point in this process: exit status, stdout, stderr."""
    argv, sys.argv = sys.argv, ["aicfl", *args]
    code: int | str | None = 0
    try:
        with CliRunner().isolation(env={"COLUMNS": "200"}) as (out, err, _):
            try:
                main()
            except SystemExit as ended:
                code = ended.code
            sys.stdout.flush()
            sys.stderr.flush()
            return Shown(0 if code is None else int(code), out.getvalue().decode(), err.getvalue().decode())
    finally:
        sys.argv = argv


def assert_one_error_line(shown: Shown, *fragments: str) -> None:
    assert (shown.code, shown.out) == (1, ""), shown
    assert shown.err.startswith("error: ") and shown.err.count("\n") == 1, shown
    assert "Traceback" not in shown.err, shown
    for fragment in fragments:
        assert fragment in shown.err, shown


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    parent = tmp_path_factory.mktemp("apps")
    shown = aicfl("app", "new", NAME, "--dir", str(parent))
    assert (shown.code, shown.err) == (0, ""), shown
    return parent / NAME


@pytest.fixture
def importable(project: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The new app importable, as ``pip install -e .`` makes it; forgotten again afterwards."""
    monkeypatch.syspath_prepend(str(project))
    yield project
    for module in [m for m in sys.modules if m == NAME or m.startswith(f"{NAME}.")]:
        del sys.modules[module]


def test_new_writes_the_project_and_prints_the_next_steps(tmp_path: Path) -> None:
    shown = aicfl("app", "new", "weather_model", "--dir", str(tmp_path))
    assert (shown.code, shown.err) == (0, ""), shown
    root = tmp_path / "weather_model"
    written = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert written == sorted(
        [
            ".gitignore",
            "README.md",
            "job.toml",
            "pyproject.toml",
            "tests/test_app.py",
            "weather_model/__init__.py",
            "weather_model/make_data.py",
            "weather_model/task.py",
        ]
    )
    assert "class WeatherModelApp(App):" in (root / "weather_model" / "__init__.py").read_text()
    assert "{{" not in "".join((root / f).read_text() for f in written)
    for step in (
        f"Created the aicfl app 'weather_model' in {root}",
        "pip install -e .",
        "python -m pytest",
        "python -m weather_model.make_data data --devices 3",
        "aicfl jobs submit job.toml",
        "aicfl-agent enroll --coordinator URL --token TOKEN --data data/device-0.npz",
    ):
        assert step in shown.out, shown.out


def test_the_new_apps_own_tests_pass(project: Path) -> None:
    # As its README says: `python -m pytest` in the project, with aicfl installed beside it.
    env = {**os.environ, "PYTHONPATH": str(project)}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    passed = re.search(r"(\d+) passed", out.stdout)
    assert passed and int(passed.group(1)) >= 8 and "failed" not in out.stdout, out.stdout[-2000:]


def test_the_made_data_is_what_the_job_spec_describes(
    importable: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `python -m NAME.make_data data --devices 2 --rows 50`
    import_module(f"{NAME}.make_data").main([str(tmp_path / "data"), "--devices", "2", "--rows", "50"])
    assert capsys.readouterr().out.count("50 examples") == 3
    files = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert files == ["device-0.npz", "device-1.npz", "reference.npz"]
    options = tomllib.loads((importable / "job.toml").read_text())["model"]["options"]
    with np.load(tmp_path / "data" / "device-0.npz") as npz:
        assert npz["x"].shape == (50, options["features"]) and npz["x"].dtype == np.float32
        assert npz["y"].dtype == np.int64 and set(npz["y"]) <= set(range(options["classes"]))


def test_the_new_app_loads_as_its_job_spec_names_it(importable: Path) -> None:
    raw = tomllib.loads((importable / "job.toml").read_text())
    spec = validate_spec(raw)
    assert (spec.model.app, spec.model.app_version) == (f"{NAME}:app", FIRST_VERSION)
    app = load_app(spec.app_ref, spec.model.app_version)
    assert isinstance(app, App) and app.version == FIRST_VERSION and app.statistics is None
    vector = app.get_parameters(app.build_model(JobContext(spec)))
    assert vector.dtype == np.float32 and vector.shape == (PARAMETERS,)
    with pytest.raises(AppError, match=f"is version {FIRST_VERSION} here; the job needs 2.0"):
        load_app(spec.app_ref, "2.0")
    project = tomllib.loads((importable / "pyproject.toml").read_text())["project"]
    assert project["version"] == FIRST_VERSION


@pytest.fixture
def fed(tmp_path: Path) -> Iterator[Federation]:
    engine = make_engine(f"sqlite:///{tmp_path / 'coordinator.db'}")
    migrate(engine)
    yield Federation(
        session_factory(engine),
        LocalBlobStore(tmp_path / "blobs"),
        Ed25519PrivateKey.generate(),
        EngineSettings(eligibility_window=60),
    )
    engine.dispose()


def test_a_coordinator_accepts_the_new_apps_job_and_its_reference_data(
    importable: Path, fed: Federation, tmp_path: Path
) -> None:
    raw = tomllib.loads((importable / "job.toml").read_text())
    job = fed.jobs.submit(raw, "op")  # imports the app, builds version 0 under the job's seed
    assert job.status == "running" and job.current_version == 0
    with fed.read() as s:
        (v0,) = s.query(ModelVersion).filter(ModelVersion.job_id == job.id).all()
        header, vector = registry.load_vector(fed.blobs, v0)
    assert vector.shape == (PARAMETERS,) and np.isfinite(vector).all()
    assert header["arch"]["app"] == f"{NAME}:app" and header["arch"]["app_version"] == FIRST_VERSION

    *_, reference = import_module(f"{NAME}.make_data").make_data(tmp_path / "data", devices=1, rows=60)
    assert reference.name == raw["evaluation"]["reference"].rsplit("/", 1)[-1]
    fed.jobs.set_reference(job.id, reference.read_bytes(), "op")
    with pytest.raises(Invalid, match=r"reference data: the data is not a \.npz file"):
        fed.jobs.set_reference(job.id, b"a,b\n1,2\n", "op")
    # Central evaluation of a version, as each round's finish runs it, on the reference data.
    with fed.read() as s:
        row = s.get(Job, job.id)
        assert row is not None and row.reference_sha256 is not None
        assert fed.blobs.get(row.reference_sha256) == reference.read_bytes()
        central = fed.central(row, validate_spec(raw), header["arch"], vector)
    assert central is not None and set(central) == {"loss", "accuracy", "examples"}, central
    assert central["examples"] == 60 and 0 <= central["accuracy"] <= 1


def test_the_new_package_builds_a_wheel_that_needs_only_torch_and_numpy(
    project: Path, tmp_path: Path
) -> None:
    # A copy, so that the build's egg-info stays out of the project the other tests read.
    build = tmp_path / "build"
    subprocess.run(["cp", "-r", str(project), str(build)], check=True)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            "dist",
            ".",
        ],
        cwd=build,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (wheel,) = (build / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(f"{NAME}-{FIRST_VERSION}.dist-info/METADATA").decode()
    assert {f"{NAME}/__init__.py", f"{NAME}/task.py", f"{NAME}/make_data.py"} <= names
    assert sorted(re.findall(r"^Requires-Dist: (.+)$", metadata, re.M)) == ["numpy", "torch"]


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("My-App", "'My-App' is not a Python package name: use lower-case letters, digits and underscores"),
        ("1app", "'1app' is not a Python package name"),
        ("", "'' is not a Python package name"),
        ("class", "'class' is a Python keyword"),
        ("json", "'json' is a module of Python's standard library"),
        ("shared", "'shared' is a package of aicfl itself"),
        ("tests", "'tests' is the project's folder of tests"),
        ("torch", "'torch' is a module already installed here"),
    ],
)
def test_a_bad_name_is_one_error_line_and_writes_nothing(name: str, why: str, tmp_path: Path) -> None:
    shown = aicfl("app", "new", name, "--dir", str(tmp_path))
    assert_one_error_line(shown, why, "pick another name")
    assert list(tmp_path.iterdir()) == []


def test_the_error_suggests_a_name_that_would_do(tmp_path: Path) -> None:
    assert_one_error_line(aicfl("app", "new", "My-App", "--dir", str(tmp_path)), "such as 'my_app'")
    assert_one_error_line(aicfl("app", "new", "json", "--dir", str(tmp_path)), "such as 'json_app'")


def test_a_folder_in_the_way_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    shown = aicfl("app", "new", "taken", "--dir", str(tmp_path))
    assert_one_error_line(shown, f"{tmp_path / 'taken'} already exists and is not empty")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"

    (tmp_path / "a_file").write_text("x")
    assert_one_error_line(aicfl("app", "new", "a_file", "--dir", str(tmp_path)), "exists and is not a folder")
    assert_one_error_line(aicfl("app", "new", "fine_name", "--dir", str(tmp_path / "a_file")), "is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "taken"]


def test_an_empty_folder_is_filled(tmp_path: Path) -> None:
    (tmp_path / "empty_app").mkdir()
    assert aicfl("app", "new", "empty_app", "--dir", str(tmp_path)).code == 0
    assert (tmp_path / "empty_app" / "empty_app" / "__init__.py").is_file()


def test_every_template_is_package_data_and_written() -> None:
    # An installed aicfl (not this checkout) has only the templates its wheel carries.
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = package_data["server"]
    files = (p for p in (ROOT / "server" / "templates").rglob("*") if p.is_file())
    templates = sorted(p.relative_to(ROOT / "server").as_posix() for p in files)
    assert templates, "no templates found"
    assert [t for t in templates if not any(fnmatch.fnmatch(t, g) for g in globs)] == []
    assert sorted(f"templates/app/{name}" for name in FILES) == templates


def _complete_example() -> dict[str, str]:
    """The code blocks of docs/apps.md's "A complete example", by language."""
    section = (ROOT / "docs" / "apps.md").read_text().split("\n## A complete example\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    return dict(re.findall(r"```(\w+)\n(.*?)```", section, re.S))


@pytest.fixture
def sensors_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on sys.path for the docs' ``sensors`` module, forgotten again afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("sensors", None)


def test_the_complete_example_in_the_docs_loads_as_its_spec_names_it_and_learns(sensors_folder: Path) -> None:
    import torch

    from shared.apps import DataError, DeviceContext, TrainConfig

    tmp_path = sensors_folder
    blocks = _complete_example()
    (tmp_path / "sensors.py").write_text(blocks["python"])
    spec = validate_spec(tomllib.loads(blocks["toml"]))
    app = load_app(spec.app_ref, spec.model.app_version)
    job = JobContext(spec)
    rng = np.random.default_rng(0)
    centres = rng.normal(0.0, 2.0, size=(4, 6))
    y = rng.integers(0, 4, size=400)
    np.savez(tmp_path / "readings.npz", x=(centres[y] + rng.normal(size=(400, 6))).astype(np.float32), y=y)
    data = app.load_data(DeviceContext(job, str(tmp_path / "readings.npz"), "device-0"))
    app.check_data(data, job)
    torch.manual_seed(0)
    model = app.build_model(job)
    before = app.evaluate(model, data)
    t = spec.training
    config = TrainConfig(1, 5, t.batch_size, t.learning_rate, t.optimizer, seed=1, proximal_mu=0.01)
    metrics = app.train(model, data, config)
    after = app.evaluate(model, data)
    assert metrics["examples"] == data.train_examples == 320 and np.isfinite(metrics["loss"])
    assert after["accuracy"] >= 0.8 and after["loss"] < before["loss"], (before, after)
    reference = app.load_reference((tmp_path / "readings.npz").read_bytes(), job)
    assert app.evaluate_central(model, reference, job) is not None
    # The reason the docs show for data of the wrong width.
    np.savez(tmp_path / "narrow.npz", x=np.zeros((120, 5), np.float32), y=np.zeros(120, np.int64))
    narrow = app.load_data(DeviceContext(job, str(tmp_path / "narrow.npz"), "device-0"))
    with pytest.raises(DataError) as refused:
        app.check_data(narrow, job)
    assert f"data does not match the job's schema: {refused.value}" in (ROOT / "docs" / "apps.md").read_text()


def test_a_failed_write_is_one_error_line_and_leaves_no_half_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_text = Path.write_text
    written: list[Path] = []

    def fill_the_disk_on_the_third_file(self: Path, *args: Any, **kwargs: Any) -> int:
        if len(written) == 2:
            raise OSError(28, "No space left on device", str(self))
        written.append(self)
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", fill_the_disk_on_the_third_file)
    shown = aicfl("app", "new", "full_disk", "--dir", str(tmp_path))
    assert_one_error_line(shown, f"cannot write {tmp_path / 'full_disk'}", "No space left on device")
    assert list(tmp_path.iterdir()) == []

    written.clear()
    (tmp_path / "kept").mkdir()  # a folder the user made stays, emptied again
    assert_one_error_line(aicfl("app", "new", "kept", "--dir", str(tmp_path)), "No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and list((tmp_path / "kept").iterdir()) == []
