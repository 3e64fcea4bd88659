"""Pre-training refuses, in one line, what it cannot do well: bad options, an unfit Horovod, disagreeing ranks.

Horovod's launcher is replaced here by a shell script that plays a run that went
wrong (a rank that wrote nothing, ranks that disagree, a crash), so that the
launcher's own checks can be seen to refuse the upload, or that starts the one
real rank itself; real two-rank runs are in test_pretrain.py.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from shared.api_client import CliError
from shared.jobspec import validate_spec
from shared.tabular import Preprocessor, local_statistics, merge_statistics
from training_cluster.pretrain import check_horovod, pretrain, train_ranks

SPEC: dict[str, Any] = {
    "name": "t",
    "rounds": 1,
    "data": {"features": [{"name": "x", "type": "numeric"}], "target": "y", "task": "binary"},
    "model": {"hidden": [2], "initial": "pretrained"},
}
CHECK_BUILD_CPU = "Available Frameworks:\n    [X] PyTorch\nAvailable Controllers:\n    [X] Gloo\n"


def fake_horovodrun(folder: Path, script: str, check_build: str = CHECK_BUILD_CPU) -> Path:
    """An executable standing in for horovodrun; ``$dir`` is the run's work folder (its config's)."""
    path = folder / "horovodrun"
    path.write_text(
        "#!/bin/sh\n"
        f"if [ \"$1\" = --check-build ]; then printf '{check_build}'; exit 0; fi\n"
        'for a; do last="$a"; done; dir=$(dirname "$last")\n' + script
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


class JobApi:
    """The ClusterApi calls pre-training makes, over one job; nothing is ever uploaded here."""

    def __init__(
        self, job: dict[str, Any], preprocess: dict[str, Any] | None = None, reference: bytes = b""
    ) -> None:
        self._job = job
        self._preprocess = preprocess
        self._reference = reference
        self.uploads: list[Any] = []

    def job(self, job_id: int) -> dict[str, Any]:
        return self._job

    def wait_for_preprocess(self, job_id: int, timeout: float) -> dict[str, Any]:
        return {**self._job, "preprocess": self._preprocess}

    def reference(self, job_id: int) -> bytes:
        return self._reference

    def upload_version0(self, *args: Any) -> dict[str, Any]:
        self.uploads.append(args)
        return {"version": 0, "sha256": "0" * 64}


def central(tmp_path: Path, labels: list[str]) -> Path:
    path = tmp_path / "central.csv"
    pd.DataFrame({"x": np.arange(len(labels), dtype=float), "y": labels}).to_csv(path, index=False)
    return path


# --------------------------------------------------------------------------- options and jobs


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"np": 0}, "--np must be at least 1, got 0"),
        ({"epochs": 0}, "--epochs must be at least 1, got 0"),
        ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
        ({"learning_rate": -0.1}, "--learning-rate must be positive, got -0.1"),
    ],
)
def test_options_out_of_range_are_refused_before_the_coordinator_is_asked(
    options: dict[str, Any], message: str, tmp_path: Path
) -> None:
    api = JobApi({})
    api.job = None  # type: ignore[assignment,method-assign]  # must not be called
    with pytest.raises(CliError, match=f"^{message}$"):
        pretrain(api, 1, tmp_path / "central.csv", **options)  # type: ignore[arg-type]


def test_a_job_that_already_has_a_version_is_not_pretrained(tmp_path: Path) -> None:
    api = JobApi({"id": 1, "spec": SPEC, "current_version": 3})
    with pytest.raises(CliError, match="^job 1 already has a model version 3; nothing to pre-train$"):
        pretrain(api, 1, central(tmp_path, ["no", "yes"]))  # type: ignore[arg-type]


def test_fewer_central_rows_than_ranks_is_refused(tmp_path: Path) -> None:
    api = JobApi({"id": 1, "spec": SPEC, "current_version": None})
    data = central(tmp_path, ["no", "yes", "no"])
    with pytest.raises(CliError, match=f"^central data {data} has 3 rows, fewer than the 4 ranks$"):
        pretrain(api, 1, data, np=4)  # type: ignore[arg-type]


def test_central_labels_the_federation_never_saw_are_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AICFL_HOROVODRUN", str(fake_horovodrun(tmp_path, "exit 99\n")))
    schema = validate_spec(SPEC).data
    federation = pd.DataFrame({"x": [1.0, 2.0], "y": ["no", "yes"]})
    pre = Preprocessor.from_statistics(merge_statistics([local_statistics(federation, schema)]), schema)
    api = JobApi({"id": 1, "spec": SPEC, "current_version": None}, pre.to_dict())
    data = central(tmp_path, ["maybe", "yes", "maybe", "yes"])
    with pytest.raises(CliError) as err:
        pretrain(api, 1, data, np=2, workdir=tmp_path / "work")  # type: ignore[arg-type]
    assert (
        str(err.value)
        == f"central data {data}: column 'y' (target): label 'maybe' is not one of 'no', 'yes' (row 1)"
    )
    assert not (tmp_path / "work").exists()  # nothing was launched


def test_reference_rows_that_do_not_fit_the_job_stop_the_upload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The launcher here starts the one real rank itself (a world of one, no horovodrun).
    rank = f'exec "{sys.executable}" -m training_cluster.hvd_worker "$last"\n'
    monkeypatch.setenv("AICFL_HOROVODRUN", str(fake_horovodrun(tmp_path, rank)))
    schema = validate_spec(SPEC).data
    data = central(tmp_path, ["no", "yes", "no", "yes"])
    pre = Preprocessor.from_statistics(
        merge_statistics([local_statistics(pd.read_csv(data), schema)]), schema
    )
    job = {"id": 1, "spec": SPEC, "current_version": None, "reference": {"rows": 2}}
    api = JobApi(job, pre.to_dict(), reference=b"z,y\n1,no\n2,yes\n")
    with pytest.raises(CliError) as err:
        pretrain(api, 1, data, np=1, epochs=1, workdir=tmp_path / "work")  # type: ignore[arg-type]
    assert str(err.value).startswith("job 1's reference data: column 'x': missing from the data")
    assert (tmp_path / "work" / "final.npy").exists()  # it trained,
    assert api.uploads == []  # but a version that cannot be measured is not registered


# --------------------------------------------------------------------------- the Horovod build


def test_gpus_with_a_cpu_only_horovod_say_how_to_rebuild_it(tmp_path: Path) -> None:
    run = fake_horovodrun(tmp_path, "exit 0\n")
    assert check_horovod(run) != ""  # fine for CPU ranks
    with pytest.raises(CliError) as err:
        check_horovod(run, gpus=True)
    assert str(err.value) == (
        f"{run} was built without NCCL (horovodrun --check-build); rebuild it on a CUDA host with"
        f" `AICFL_HOROVOD_GPU=1 bash scripts/install_horovod.sh {sys.executable}`"
    )


def test_gpus_are_counted_before_any_rank_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    nccl = CHECK_BUILD_CPU + "Available Tensor Operations:\n    [X] NCCL\n"
    monkeypatch.setenv("AICFL_HOROVODRUN", str(fake_horovodrun(tmp_path, "exit 99\n", nccl)))
    api = JobApi({"id": 1, "spec": SPEC, "current_version": None})
    wanted = torch.cuda.device_count() + 1
    data = central(tmp_path, ["no", "yes"] * wanted)
    with pytest.raises(CliError) as err:
        pretrain(api, 1, data, np=wanted, gpus=True)  # type: ignore[arg-type]
    assert str(err.value) == (
        f"--gpus with --np {wanted} needs {wanted} GPUs on this host; torch sees {wanted - 1}"
    )


def test_a_horovod_without_pytorch_or_gloo_points_to_the_install_script(tmp_path: Path) -> None:
    run = tmp_path / "horovodrun"
    run.write_text("#!/bin/sh\necho 'Available Frameworks:'; echo '    [X] TensorFlow'\n")
    run.chmod(0o755)
    with pytest.raises(
        CliError, match=r"was built without PyTorch, Gloo \(horovodrun --check-build\); install it"
    ):
        check_horovod(run)


def test_a_horovodrun_that_cannot_start_is_one_line(tmp_path: Path) -> None:
    run = tmp_path / "horovodrun"
    run.write_text("#!/nonexistent/interpreter\n")
    run.chmod(0o755)
    with pytest.raises(CliError, match=f"^{run} --check-build failed: .*; install it with") as err:
        check_horovod(run)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- the ranks' results


@pytest.mark.parametrize(
    ("script", "message"),
    [
        (
            'echo aaaa > "$dir/rank-0.sha256"; exit 0\n',
            "rank 1 wrote no final parameter hash (full log: {log})",
        ),
        (
            'echo aaaaaaaaaaaaaaaa > "$dir/rank-0.sha256"; echo bbbbbbbbbbbbbbbb > "$dir/rank-1.sha256"; exit 0\n',
            "the ranks ended with different parameters (rank 0: aaaaaaaaaaaa, rank 1: bbbbbbbbbbbb);"
            " not uploading (log: {log})",
        ),
        (
            'for r in 0 1; do echo cccc > "$dir/rank-$r.sha256"; done; echo "{}" > "$dir/result.json"\n'
            'cp "$dir/x.npy" "$dir/final.npy"; exit 0\n',
            "{work}/final.npy does not match rank 0's parameter hash",
        ),
        (
            "echo 'gloo: rendezvous with rank 1 timed out'; exit 3\n",
            "pre-training failed (horovodrun exit 3): {run} -np 2 -H localhost:2 --gloo --start-timeout 120"
            " {python} -m training_cluster.hvd_worker {work}/config.json | gloo: rendezvous with rank 1 timed out"
            " (full log: {log})",
        ),
    ],
    ids=["missing-hash", "ranks-disagree", "final-file-differs", "launcher-failed"],
)
def test_parameters_are_not_returned_unless_every_rank_ended_with_the_same(
    script: str, message: str, tmp_path: Path
) -> None:
    run = fake_horovodrun(tmp_path, script)
    work = tmp_path / "work"
    x = np.zeros((4, 1), dtype=np.float32)
    y = np.array([0, 1, 0, 1], dtype=np.float32)
    arch = {"zoo": "mlp", "input_dim": 1, "output_dim": 1, "hidden": [2], "dropout": 0.0}
    with pytest.raises(CliError) as err:
        train_ranks(
            x,
            y,
            arch,
            task="binary",
            world=2,
            epochs=1,
            batch_size=2,
            learning_rate=0.1,
            workdir=work,
            horovodrun=run,
            threads=1,
        )
    log = work / "horovodrun.log"
    assert str(err.value) == message.format(log=log, work=work, run=run, python=sys.executable)
    assert os.path.exists(log)
