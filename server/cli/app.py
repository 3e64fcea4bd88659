"""``aicfl app``: start an app, the package a job spec names as ``[model] app`` (docs/apps.md).

``aicfl app new NAME`` writes a project that works as it is, as ``flwr new`` does for Flower: a
small PyTorch classifier on ``.npz`` data (the app, its model and training), a job spec naming it,
a script that makes example data for a few devices, tests that train it, and a README with the
steps. The files come from the templates in ``server/templates/app/``.
"""

from __future__ import annotations

import importlib.util
import keyword
import re
import shutil
import sys
from importlib import resources
from pathlib import Path

import typer

from shared.api_client import CliError

app = typer.Typer(help="Apps: your model, data and training code, as a package.", no_args_is_help=True)

#: The version a new app starts at: its package's, its ``App.version`` and its job spec's ``app_version``.
FIRST_VERSION = "1.0.0"

#: Each template and where it goes in the new project; ``{name}`` is the app's package.
FILES = {
    "pyproject.toml.tmpl": "pyproject.toml",
    "README.md.tmpl": "README.md",
    "job.toml.tmpl": "job.toml",
    "gitignore.tmpl": ".gitignore",
    "__init__.py.tmpl": "{name}/__init__.py",
    "task.py.tmpl": "{name}/task.py",
    "make_data.py.tmpl": "{name}/make_data.py",
    "test_app.py.tmpl": "tests/test_app.py",
}

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# aicfl's own packages, which an app of the same name would shadow.
_AICFL = {"aicfl", "shared", "client_agent", "coordinator", "server", "training_cluster"}


class NewAppError(ValueError):
    """A new app that cannot be written as asked; the message says why and what would do."""


class AppNameError(NewAppError):
    """A name that cannot be an app's package."""


def _problem(name: str) -> str | None:
    """Why ``name`` cannot be a new app's package, or None when it can."""
    if not _NAME.match(name):
        return "is not a Python package name: use lower-case letters, digits and underscores, starting with a letter"
    if keyword.iskeyword(name):
        return "is a Python keyword"
    if name in sys.stdlib_module_names:
        return "is a module of Python's standard library"
    if name in _AICFL:
        return "is a package of aicfl itself"
    if name == "tests":
        return "is the project's folder of tests"
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a module whose import left it half made is there all the same
        found = True
    return "is a module already installed here" if found else None


def check_name(name: str) -> str:
    """``name`` when it can be a new app's package: lower-case letters, digits and underscores,
    starting with a letter, and no module that is already importable here (the standard library,
    aicfl's packages, anything installed), which ``import name`` would find instead of the app.
    Raises :class:`AppNameError` saying why not, with a name that would do where one is near."""
    problem = _problem(name)
    if problem is None:
        return name
    if _NAME.match(name):
        hint = f"{name}_app"
    else:
        hint = re.sub(r"^[0-9_]+", "", re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_"))
    suggestion = f", such as {hint!r}" if len(hint) > 1 and hint != name and _problem(hint) is None else ""
    raise AppNameError(f"{name!r} {problem}; pick another name{suggestion}")


def class_name(name: str) -> str:
    """The app's class: ``my_model`` → ``MyModelApp``, ``fraud_app`` → ``FraudApp`` (never ``App``,
    the base class it derives from)."""
    words = "".join(part.capitalize() for part in name.split("_"))
    return words if words.endswith("App") and words != "App" else f"{words}App"


def render(name: str, version: str = FIRST_VERSION) -> dict[str, str]:
    """The new project's files, path (relative to the project) to text, from the templates."""
    templates = resources.files("server") / "templates" / "app"
    values = {"name": name, "class_name": class_name(name), "version": version}
    out = {}
    for template, target in FILES.items():
        text = (templates / template).read_text(encoding="utf-8")
        for key, value in values.items():
            text = text.replace("{{" + key + "}}", value)
        if "{{" in text:
            raise RuntimeError(
                f"template {template} has a placeholder left: {text[text.index('{{') :][:40]!r}"
            )
        out[target.format(name=name)] = text
    return out


def write_app(name: str, parent: Path) -> Path:
    """Write the project of app ``name`` into ``parent/name``, a folder that must be new or empty.

    Raises :class:`NewAppError` for a bad name or something in the way, and ``OSError`` when a file
    cannot be written (what was written of the project is removed again)."""
    check_name(name)
    root = parent / name
    if parent.exists() and not parent.is_dir():
        raise NewAppError(f"{parent} is a file, not a folder")
    if root.exists() and not root.is_dir():
        raise NewAppError(f"{root} exists and is not a folder; pick another name or --dir")
    if root.is_dir() and any(root.iterdir()):
        raise NewAppError(f"{root} already exists and is not empty; pick another name or --dir")
    files = render(name)
    created = not root.exists()
    try:
        for relative, text in files.items():
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    except OSError:
        if created:
            shutil.rmtree(root, ignore_errors=True)
        else:  # an empty folder the user made: leave it, emptied again
            for child in root.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise
    return root


def next_steps(name: str, root: Path) -> str:
    """What to do with the new project, as ``flwr new`` prints it."""
    try:
        where = root.relative_to(Path.cwd())
    except ValueError:
        where = root
    steps = [
        ("pip install -e .", "on the coordinator and on every device"),
        ("python -m pytest", "the app trains on made data"),
        (f"python -m {name}.make_data data --devices 3", "data/device-*.npz, data/reference.npz"),
        ("aicfl jobs submit job.toml", "to a running coordinator (README.md)"),
    ]
    width = max(len(command) for command, _ in steps)
    lines = "\n".join(f"  {command:{width}}  # {comment}" for command, comment in steps)
    return (
        f"Created the aicfl app {name!r} in {root}\n\nNext steps:\n\n  cd {where}\n{lines}\n\n"
        "  and on each device, with the app installed and its own data file:\n"
        "  aicfl-agent enroll --coordinator URL --token TOKEN --data data/device-0.npz\n\n"
        f"The app is {name}/__init__.py, its model and training {name}/task.py, its job spec job.toml.\n"
    )


@app.command("new")
def app_new(
    name: str = typer.Argument(..., help="The app's package name, e.g. my_app."),
    directory: Path = typer.Option(Path("."), "--dir", help="Folder to create the project in, as DIR/NAME."),
) -> None:
    """Write a new app project: its model, data loader, training, evaluation, job spec and tests."""
    try:
        root = write_app(name, directory.resolve())
    except NewAppError as err:
        raise CliError(str(err)) from None
    except OSError as err:
        raise CliError(f"cannot write {err.filename or directory}: {err.strerror or err}") from None
    print(next_steps(name, root), end="")
