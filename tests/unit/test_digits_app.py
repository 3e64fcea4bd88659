"""The example app (examples/digits_cnn, installed by `make setup`) as the agent and the coordinator
call it: its data files, its checks, its training, its version, its label-skewed split, and the
digits data the demo writes."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from digits_cnn import app
from digits_cnn.data import (
    dirichlet_partition,
    label_counts,
    load_digits,
    main,
    read_npz,
    split,
    stratified_split,
    write_npz,
    write_split,
)

from server.demo import DemoError, demo_steps, prepare_data
from shared.apps import AppError, DataError, DeviceContext, JobContext, TrainConfig, load_app
from shared.jobspec import load_spec, validate_spec

ROOT = Path(__file__).resolve().parents[2]
VERSION = metadata.version("digits-cnn")


def job(seed: int = 7, **extra: Any) -> JobContext:
    spec = validate_spec(
        {
            "name": "digits",
            "rounds": 1,
            "seed": seed,
            "model": {"app": "digits_cnn:app", "app_version": VERSION},
        }
        | extra
    )
    return JobContext(spec, {})


def device(path: Path, device_id: str = "dev-1", **extra: Any) -> DeviceContext:
    return DeviceContext(job(**extra), str(path), device_id)


def config(
    epochs: int = 1,
    seed: int = 3,
    optimizer: str = "adam",
    learning_rate: float = 0.003,
    proximal_mu: float = 0.0,
    threads: int = 1,
) -> TrainConfig:
    return TrainConfig(
        round=1,
        epochs=epochs,
        batch_size=32,
        learning_rate=learning_rate,
        optimizer=optimizer,
        seed=seed,
        threads=threads,
        proximal_mu=proximal_mu,
    )


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return load_digits()


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(7)
    return app.build_model(job())


# -- the version the job spec names ----------------------------------------------------------------


def test_the_app_is_the_installed_release_and_a_job_must_name_that_version() -> None:
    assert app.version == VERSION == "1.0.0"
    assert load_app("digits_cnn:app", VERSION) is app
    with pytest.raises(AppError, match=r"is version 1\.0\.0 here; the job needs 1\.2\.0"):
        load_app("digits_cnn:app", "1.2.0")


def test_the_example_job_spec_is_valid_and_names_the_installed_version() -> None:
    path = ROOT / "examples" / "digits_cnn" / "digits.toml"
    spec = load_spec(path)
    assert (spec.model.app, spec.model.app_version) == ("digits_cnn:app", VERSION)
    # Its options build the app's model.
    net = app.build_model(JobContext(spec, {}))
    assert app.get_parameters(net).dtype == np.float32
    # The package's own pyproject holds the version the app reports.
    pyproject = tomllib.loads((ROOT / "examples" / "digits_cnn" / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == VERSION


def test_unknown_or_bad_model_options_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown model.options for digits_cnn: width"):
        app.build_model(job(model={"app": "digits_cnn:app", "app_version": VERSION, "options": {"width": 3}}))
    with pytest.raises(ValueError, match="channels must be two integers"):
        app.build_model(
            job(model={"app": "digits_cnn:app", "app_version": VERSION, "options": {"channels": [8]}})
        )


# -- data files and their check ------------------------------------------------------------------


def test_load_data_splits_a_device_file_into_training_and_holdout_images(tmp_path: Path, digits) -> None:
    images, labels = digits
    path = write_npz(tmp_path / "d.npz", images[:200], labels[:200])
    data = app.load_data(device(path))
    app.check_data(data, job())
    assert (data.train_examples, data.holdout_examples) == (160, 40)  # [training] holdout = 0.2
    x, y = data.train.tensors
    assert x.shape == (160, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    # The holdout images are none of the training ones, and the split is the device's own.
    together = np.concatenate([data.train.labels, data.holdout.labels])
    assert sorted(together.tolist()) == sorted(labels[:200].tolist())
    other = app.load_data(device(path, device_id="dev-2"))
    assert not np.array_equal(other.holdout.images, data.holdout.images)


def test_the_0_to_16_scale_reads_as_the_same_inputs_as_0_to_1(tmp_path: Path, digits) -> None:
    images, labels = digits
    unit = app.load_data(device(write_npz(tmp_path / "unit.npz", images[:50], labels[:50])))
    raw = tmp_path / "raw.npz"
    np.savez(raw, images=np.rint(images[:50] * 16).astype(np.int64), labels=labels[:50])
    sixteen = app.load_data(device(raw))
    app.check_data(sixteen, job())
    assert torch.allclose(unit.train.tensors[0], sixteen.train.tensors[0])
    assert float(sixteen.train.tensors[0].max()) <= 1.0


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((20, 64)), "labels": np.zeros(20, int)}, r"images must have shape \(n, 8, 8\); got \(20, 64\)"),
        ({"images": np.zeros((20, 8, 8)), "labels": np.full(20, 10)}, r"labels must lie in 0\.\.9; found 10 to 10"),
        ({"images": np.zeros((20, 8, 8)), "labels": np.full(20, -1)}, r"labels must lie in 0\.\.9; found -1 to -1"),
        ({"images": np.zeros((20, 8, 8)), "labels": np.full(20, 2.5)}, r"labels must be whole numbers 0\.\.9"),
        ({"images": np.zeros((20, 8, 8)), "labels": np.array(["3"] * 20)}, r"labels must be integers 0\.\.9; got dtype <U1"),
        ({"images": np.full((20, 8, 8), np.nan), "labels": np.zeros(20, int)}, r"images must be finite; 20 of 20 hold NaN or infinity"),
        ({"images": np.full((20, 8, 8), 17.0), "labels": np.zeros(20, int)}, r"pixel values must lie in \[0, 1\] or on the 0\.\.16 scale; found 17 to 17"),
        ({"images": -np.ones((20, 8, 8)), "labels": np.zeros(20, int)}, r"found -1 to -1"),
    ],
    ids=["flat-images", "label-10", "label-negative", "label-fraction", "label-text", "nan", "above-16", "negative"],
)  # fmt: skip
def test_check_data_refuses_unusable_images_or_labels_with_a_clear_message(
    tmp_path: Path, arrays: dict[str, Any], message: str
) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    data = app.load_data(device(path))
    with pytest.raises(DataError, match=message):
        app.check_data(data, job())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"label,px0\n1,0\n", r"not a readable \.npz of images and labels"),
        ({"images": np.zeros((5, 8, 8))}, r"no labels array in the \.npz \(arrays found: images\)"),
        ({"x": np.zeros((5, 8, 8)), "y": np.zeros(5)}, r"no images or labels array in the \.npz \(arrays found: x, y\)"),
        ({"images": np.zeros((5, 8, 8)), "labels": np.zeros(4, int)}, r"images \(5, 8, 8\) and labels \(4,\) do not hold the same number"),
        ({"images": np.array([{"a": 1}] * 5, dtype=object), "labels": np.zeros(5, int)}, r"not a readable \.npz"),
    ],
    ids=["csv", "no-labels", "other-names", "lengths", "pickled-objects"],
)  # fmt: skip
def test_load_data_refuses_a_file_it_cannot_read_saying_why(
    tmp_path: Path, content: object, message: str
) -> None:
    path = tmp_path / "data.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.savez(path, **content)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=f"^{tmp_path}/data.npz: {message}"):
        app.load_data(device(path))


def test_a_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a readable .npz"):
        app.load_data(device(tmp_path / "nowhere.npz"))


# -- training and evaluation ---------------------------------------------------------------------


def test_training_on_a_device_file_lifts_held_out_accuracy_far_above_chance(
    tmp_path: Path, digits, model: torch.nn.Module
) -> None:
    images, labels = digits
    rest, test = stratified_split(labels, 0.2, seed=0)
    data = app.load_data(device(write_npz(tmp_path / "d.npz", images[rest], labels[rest])))
    reference = app.load_reference(
        (write_npz(tmp_path / "ref.npz", images[test], labels[test])).read_bytes(), job()
    )
    before = app.evaluate_central(model, reference, job())
    assert before["examples"] == len(test) == 359
    result = app.train(model, data, config(epochs=5))
    after = app.evaluate_central(model, reference, job())
    holdout = app.evaluate(model, data)
    assert before["accuracy"] < 0.3 and after["accuracy"] > 0.9, (before, after)
    assert after["loss"] < before["loss"] and result["loss"] < 0.5
    assert set(holdout) == {"loss", "accuracy"} and holdout["accuracy"] > 0.9


def test_training_is_seeded_and_leaves_torch_s_global_state_alone(tmp_path: Path, digits) -> None:
    images, labels = digits
    data = app.load_data(device(write_npz(tmp_path / "d.npz", images[:300], labels[:300])))
    start = app.get_parameters(app.build_model(job()))

    def trained(seed: int, threads: int = 1) -> np.ndarray:
        net = app.build_model(job())
        app.set_parameters(net, start)
        app.train(net, data, config(seed=seed, threads=threads))
        return app.get_parameters(net)

    first = trained(1)
    assert np.array_equal(first, trained(1))
    assert not np.array_equal(first, trained(2))
    assert not np.array_equal(first, start)
    net, threads, state = app.build_model(job()), torch.get_num_threads(), torch.random.get_rng_state()
    app.train(net, data, config(threads=threads + 1))
    assert torch.equal(torch.random.get_rng_state(), state) and torch.get_num_threads() == threads


def test_sgd_and_the_fedprox_term_are_honoured(tmp_path: Path, digits) -> None:
    images, labels = digits
    data = app.load_data(device(write_npz(tmp_path / "d.npz", images[:300], labels[:300])))
    start = app.get_parameters(app.build_model(job()))

    def moved(optimizer: str = "sgd", proximal_mu: float = 0.0) -> float:
        net = app.build_model(job())
        app.set_parameters(net, start)
        app.train(
            net, data, config(epochs=3, optimizer=optimizer, learning_rate=0.05, proximal_mu=proximal_mu)
        )
        return float(np.linalg.norm(app.get_parameters(net) - start))

    free = moved()
    held = moved(proximal_mu=5.0)
    assert 0 < held < 0.8 * free, (held, free)
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        moved(optimizer="rmsprop")


def test_a_reference_file_is_checked_like_a_device_file(tmp_path: Path) -> None:
    bad = write_npz(tmp_path / "ref.npz", np.zeros((3, 8, 8)), np.array([1, 2, 11]))
    with pytest.raises(DataError, match=r"labels must lie in 0\.\.9; found 1 to 11"):
        app.load_reference(bad.read_bytes(), job())
    with pytest.raises(DataError, match=r"^the data: not a readable \.npz"):
        app.load_reference(b"not an npz", job())
    empty = write_npz(tmp_path / "empty.npz", np.zeros((0, 8, 8)), np.zeros(0))
    with pytest.raises(DataError, match="the reference data holds no images"):
        app.load_reference(empty.read_bytes(), job())


def test_audit_inputs_name_every_pixel_in_row_major_order(tmp_path: Path, digits) -> None:
    images, labels = digits
    reference = app.load_reference(write_npz(tmp_path / "r.npz", images[:7], labels[:7]).read_bytes(), job())
    inputs = app.audit_inputs(reference, job())
    assert inputs.x.shape == (7, 1, 8, 8) and inputs.image_shape == (8, 8)
    assert len(inputs.features) == 64 and inputs.features[8 * 3 + 4] == "px_3_4"
    assert np.array_equal(inputs.x[:, 0, 3, 4], images[:7, 3, 4])
    assert list(inputs.outputs or []) == [str(c) for c in range(10)]


# -- the label-skewed split ------------------------------------------------------------------------


def test_the_dirichlet_split_is_seeded_and_puts_every_example_on_exactly_one_device(digits) -> None:
    _, labels = digits
    parts = dirichlet_partition(labels, 6, alpha=0.5, seed=11)
    again = dirichlet_partition(labels, 6, alpha=0.5, seed=11)
    other = dirichlet_partition(labels, 6, alpha=0.5, seed=12)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(labels.size))
    assert min(p.size for p in parts) >= 10


def _skew(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean total-variation distance of each part's label mix from the whole set's."""
    whole = np.bincount(labels, minlength=10) / labels.size
    mixes = [np.bincount(labels[p], minlength=10) / p.size for p in parts]
    return float(np.mean([0.5 * np.abs(m - whole).sum() for m in mixes]))


def test_a_small_alpha_skews_the_devices_label_mix_and_a_large_one_does_not(digits) -> None:
    _, labels = digits
    skewed = _skew(dirichlet_partition(labels, 6, alpha=0.5, seed=3), labels)
    even = _skew(dirichlet_partition(labels, 6, alpha=1000.0, seed=3), labels)
    assert skewed > 0.3 and even < 0.08, (skewed, even)


def test_impossible_splits_are_refused() -> None:
    labels = np.arange(50) % 10
    with pytest.raises(ValueError, match="50 examples cannot give 6 devices at least 10 each"):
        dirichlet_partition(labels, 6, alpha=0.5, seed=0)
    with pytest.raises(ValueError, match="alpha must be positive"):
        dirichlet_partition(labels, 2, alpha=0.0, seed=0)


def test_split_holds_out_a_stratified_test_set_and_deals_the_rest(tmp_path: Path, digits) -> None:
    _, labels = digits
    data = split(4, alpha=0.5, seed=5)
    test_labels = data.test[1]
    assert test_labels.size == 359 and sum(part.size for _, part in data.devices) == 1797 - 359
    # Every class in the test set in proportion (about a fifth of each).
    assert all(
        abs(t - 0.2 * n) <= 1 for t, n in zip(label_counts(test_labels), label_counts(labels), strict=True)
    )
    pooled_images, pooled_labels = data.pooled
    assert label_counts(pooled_labels) == [
        a - b for a, b in zip(label_counts(labels), label_counts(test_labels), strict=True)
    ]
    # The same seed writes the same files.
    files, reference = write_split(data, tmp_path / "a")
    files_b, _ = write_split(split(4, alpha=0.5, seed=5), tmp_path / "b")
    for a, b in zip(files, files_b, strict=True):
        (ia, la), (ib, lb) = read_npz(a), read_npz(b)
        assert np.array_equal(ia, ib) and np.array_equal(la, lb)
    assert [f.relative_to(tmp_path / "a").as_posix() for f in files] == [
        f"devices/device-{i:02d}/data.npz" for i in range(4)
    ]
    assert read_npz(reference)[1].size == 359
    assert pooled_images.shape == (1797 - 359, 8, 8)


# -- the demo's digits data and steps ---------------------------------------------------------------


def test_the_demo_writes_device_files_a_reference_and_a_valid_job_for_digits(tmp_path: Path) -> None:
    data = prepare_data("digits", 3, 7, tmp_path, rounds=4, audit=False)
    spec = load_spec(tmp_path / "job.toml")
    assert (spec.model.app, spec.model.app_version, spec.rounds) == ("digits_cnn:app", VERSION, 4)
    assert spec.secure and not spec.audit.enabled and spec.data is None
    assert [f.name for f in data["files"]] == ["data.npz"] * 3
    assert sum(len(p) for p in data["parts"]) + len(data["test"]) == data["rows"] == 1797
    # Each device's file is what its agent's app reads.
    for f in data["files"]:
        app.check_data(app.load_data(device(f)), job())


def test_digits_runs_no_cluster_step_and_refuses_one_asked_for() -> None:
    steps = demo_steps("digits", None, None, None)
    assert (steps.pretrain, steps.automl, steps.audit) == (False, False, False)
    assert set(steps.skipped) == {"pretrain", "baseline", "audits"}
    assert "training_cluster/automl.py" in steps.skipped["baseline"]
    with pytest.raises(DemoError, match="--automl is not available for --dataset digits"):
        demo_steps("digits", None, True, None)
    assert demo_steps("digits", False, None, True).audit
    churn = demo_steps("mlc_churn", None, False, None)
    assert (churn.pretrain, churn.automl, churn.audit) == (True, False, True)
    assert churn.skipped == {"baseline": "not asked for (--no-automl)"}


def test_more_devices_than_the_digits_can_feed_fail_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(DemoError, match=r"^--devices 200: 1438 examples cannot give 200 devices"):
        prepare_data("digits", 200, 7, tmp_path)


def test_the_split_command_writes_the_files_and_refuses_an_impossible_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["--devices", "2", "--seed", "4", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert f"{tmp_path}/devices/device-01/data.npz" in printed and "359 test images" in printed
    assert read_npz(tmp_path / "reference.npz")[1].size == 359
    with pytest.raises(SystemExit, match="^error: 1438 examples cannot give 500 devices at least 10 each$"):
        main(["--devices", "500", "--out", str(tmp_path / "no")])
