"""The docs stay true to the repository: the job spec reference and example follow the schema, and every
markdown file the code and docs cite is in the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from shared.jobspec import load_spec, reference_markdown

ROOT = Path(__file__).resolve().parents[2]

# A cited markdown file: a path with a folder (``docs/secagg.md``, ``../../BENCHMARKS.md``, an absolute path)
# or an upper-case name (``README.md``); a lower-case bare name is more often a string in code than a citation.
_MD_PATH = re.compile(r"(?<![\w./-])(/?(?:[\w.-]+/)*[\w-][\w.-]*\.md)\b")
# A markdown link's target, whatever its case: ``[the stages](docs/secagg.md#the-stages)``.
_MD_LINK = re.compile(r"\]\(([^()\s#]+\.md)(?:#[^()\s]*)?\)")
_URL = re.compile(r"[a-z][a-z0-9+.-]*://\S+")


def test_jobspec_reference_is_generated_from_the_schema() -> None:
    assert (ROOT / "docs" / "jobspec.md").read_text() == reference_markdown() + "\n", (
        "docs/jobspec.md is stale: regenerate it with `aicfl jobs schema > docs/jobspec.md`"
    )


def test_example_spec_is_valid_and_matches_the_churn_dataset() -> None:
    from shared.datasets import load_dataset

    spec = load_spec(ROOT / "examples" / "churn.toml")
    _, schema, _ = load_dataset("mlc_churn")
    assert [f.model_dump() for f in spec.data.features] == schema["features"]
    assert (spec.data.target, spec.data.task, spec.data.positive) == (
        schema["target"],
        schema["task"],
        schema["positive"],
    )


def _repository_files() -> set[str]:
    """The repository's files as git sees them: tracked, or new and not ignored (no .venv, no build output)."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    return {name for name in out.decode().split("\0") if name and (ROOT / name).is_file()}


def _cited_markdown(text: str) -> list[str]:
    """The markdown files a text cites, in order."""
    text = _URL.sub(" ", text)
    cited = _MD_LINK.findall(text)
    for ref in _MD_PATH.findall(text):
        stem = ref.rsplit("/", 1)[-1][: -len(".md")]
        if "/" in ref or stem == stem.upper():
            cited.append(ref)
    return list(dict.fromkeys(cited))


def _missing(citing: str, text: str, files: set[str]) -> list[str]:
    """The citations in ``text`` (from the file ``citing``) that name no file of the repository, resolved
    from the repository's root or from the citing file's folder."""

    def found(ref: str) -> bool:
        targets = ((base / ref).resolve() for base in (ROOT, (ROOT / citing).parent))
        return any(t.is_relative_to(ROOT) and t.relative_to(ROOT).as_posix() in files for t in targets)

    return [ref for ref in _cited_markdown(text) if not found(ref)]


def test_every_cited_markdown_file_is_in_the_repository() -> None:
    files = _repository_files()
    problems = []
    for name in sorted(f for f in files if f.endswith((".py", ".md"))):
        for number, line in enumerate((ROOT / name).read_text(encoding="utf-8").splitlines(), start=1):
            problems += [f"{name}:{number}: {ref}" for ref in _missing(name, line, files)]
    assert not problems, (
        "cited markdown files that are not in the repository (the design lives in docs/):\n"
        + "\n".join(problems)
    )


def test_the_citation_check_catches_documents_outside_the_repository() -> None:
    files = {"README.md", "BENCHMARKS.md", "docs/secagg.md", "tests/unit/test_shamir.py"}
    outside = "DESIGN" + ".md"  # spelled in two parts so that this file cites nothing missing itself
    text = (
        f"honest-but-curious ({outside}, {outside.lower()}); see docs/secagg.md, [the figures](../../BENCHMARKS.md),"
        f" README.md, [a sibling](test_{outside.lower()}), /work/shared/{outside}, https://example.com/{outside}"
    )
    assert _missing("tests/unit/test_shamir.py", text, files) == [
        f"test_{outside.lower()}",
        outside,
        f"/work/shared/{outside}",
    ]
    assert (
        _missing("tests/unit/test_shamir.py", "[the figures](../../BENCHMARKS.md) in README.md", files) == []
    )
