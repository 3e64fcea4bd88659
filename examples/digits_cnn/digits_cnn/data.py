"""The digits as device files: reading and checking an ``.npz``, and a label-skewed split.

A device's file is an ``.npz`` with two arrays: ``images``, shape ``(n, 8, 8)``, pixel intensities
either in ``[0, 1]`` (float) or on scikit-learn's ``0..16`` scale (any array with a value above 1,
or of an integer type); and ``labels``, shape ``(n,)``, integers ``0..9``. The job's reference
data (``[evaluation] reference``, uploaded by ``aicfl jobs submit``) is a file of the same form.

The split gives each device a Dirichlet share of every class (Hsu, Qi and Brown, "Measuring the
Effects of Non-Identical Data Distribution for Federated Visual Classification", 2019): for each
class a draw ``p ~ Dir(alpha, ..., alpha)`` over the devices deals that class's examples out in
those proportions, so that a small ``alpha`` leaves most devices with a few dominant classes.
``python -m digits_cnn --devices 4 --out digits-data`` writes such a split.
"""

from __future__ import annotations

import argparse
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.apps import DataError

CLASSES = 10
SIDE = 8
#: Pixel intensities of scikit-learn's digits run from 0 to 16.
RAW_MAX = 16.0

Arrays = tuple[np.ndarray, np.ndarray]


def read_npz(source: str | Path | bytes) -> Arrays:
    """``(images, labels)`` of an ``.npz`` file (a path, or its bytes), as stored.

    Raises :class:`DataError` when it is not an ``.npz`` holding both arrays of one length.
    """
    what = "the data" if isinstance(source, bytes) else str(source)
    try:
        with np.load(io.BytesIO(source) if isinstance(source, bytes) else source, allow_pickle=False) as f:
            missing = [k for k in ("images", "labels") if k not in f.files]
            if missing:
                found = ", ".join(f.files) or "none"
                raise DataError(
                    f"{what}: no {' or '.join(missing)} array in the .npz (arrays found: {found})"
                )
            images, labels = np.asarray(f["images"]), np.asarray(f["labels"])
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as err:
        # np.load raises these for a missing file, a file that is not an .npz, or an object array.
        raise DataError(f"{what}: not a readable .npz of images and labels ({err})") from None
    if images.ndim < 1 or labels.ndim < 1 or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{what}: images {images.shape} and labels {labels.shape} do not hold the same number of examples"
        )
    return images, labels


def check_arrays(images: np.ndarray, labels: np.ndarray) -> None:
    """Raise :class:`DataError`, saying what is wrong, unless these are digits the model can take."""
    if images.ndim != 3 or images.shape[1:] != (SIDE, SIDE):
        raise DataError(f"images must have shape (n, {SIDE}, {SIDE}); got {images.shape}")
    if labels.shape != (images.shape[0],):
        raise DataError(f"labels must have shape ({images.shape[0]},), one per image; got {labels.shape}")
    if not (np.issubdtype(images.dtype, np.number) and not np.issubdtype(images.dtype, np.complexfloating)):
        raise DataError(f"images must be real numbers; got dtype {images.dtype}")
    if images.size and not np.isfinite(images).all():
        bad = int(np.count_nonzero(~np.isfinite(images).reshape(len(images), -1).all(axis=1)))
        raise DataError(f"images must be finite; {bad} of {len(images)} hold NaN or infinity")
    if images.size and (images.min() < 0 or images.max() > RAW_MAX):
        raise DataError(
            f"pixel values must lie in [0, 1] or on the 0..16 scale; found {images.min():g} to {images.max():g}"
        )
    if np.issubdtype(labels.dtype, np.floating):
        if labels.size and not (np.isfinite(labels).all() and (labels == np.round(labels)).all()):
            raise DataError("labels must be whole numbers 0..9")
    elif not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be integers 0..9; got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= CLASSES):
        raise DataError(f"labels must lie in 0..{CLASSES - 1}; found {labels.min():g} to {labels.max():g}")


def pixel_scale(images: np.ndarray) -> float:
    """What a file's pixel values are divided by to lie in ``[0, 1]``: 16 for scikit-learn's scale
    (an integer array, or any value above 1), else 1. Decided once per file, not per batch."""
    if np.issubdtype(images.dtype, np.integer):
        return RAW_MAX
    finite = images[np.isfinite(images)] if images.size else images
    return RAW_MAX if finite.size and float(finite.max()) > 1.0 else 1.0


def as_inputs(images: np.ndarray, scale: float) -> np.ndarray:
    """Checked images as the model's float32 input in ``[0, 1]``, shape ``(n, 1, 8, 8)``."""
    x = np.asarray(images, dtype=np.float32) / np.float32(scale)
    return np.ascontiguousarray(x.reshape(-1, 1, SIDE, SIDE))


def write_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write one device's (or the reference) file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez(fh, images=images.astype(np.float32), labels=labels.astype(np.int64))
    return path


# -- the split -----------------------------------------------------------------------------------


def load_digits() -> Arrays:
    """scikit-learn's bundled digits (1,797 images, read offline): images in ``[0, 1]``, labels."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    return (bunch.images / RAW_MAX).astype(np.float32), bunch.target.astype(np.int64)


def stratified_split(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(rest, held_out)``, about ``share`` of each class held out, both sorted."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"share must be between 0 and 1, got {share}")
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        held.append(rng.permutation(members)[: int(round(share * members.size))])
    is_held = np.zeros(labels.size, dtype=bool)
    is_held[np.concatenate(held)] = True
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


def dirichlet_partition(
    labels: np.ndarray, n_parts: int, alpha: float, seed: int, min_size: int = 10, max_draws: int = 1000
) -> list[np.ndarray]:
    """Indices of ``labels`` dealt to ``n_parts`` parts with Dirichlet(``alpha``) label skew.

    Every index lands in exactly one part. Draws are repeated, from one generator seeded with
    ``seed``, until every part holds at least ``min_size`` examples (``ValueError`` after
    ``max_draws``, or at once when ``n_parts * min_size`` exceeds the examples).
    """
    if n_parts < 1:
        raise ValueError(f"n_parts must be at least 1, got {n_parts}")
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if n_parts * min_size > labels.size:
        raise ValueError(f"{labels.size} examples cannot give {n_parts} devices at least {min_size} each")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_draws):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_parts)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(n_parts, alpha))
            cuts = (np.cumsum(shares)[:-1] * members.size).astype(np.int64)
            for part, chunk in zip(parts, np.split(members, cuts), strict=True):
                part.append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(p.size for p in out) >= min_size:
            return out
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw in {max_draws} gave each of {n_parts} devices {min_size} examples"
    )


@dataclass(frozen=True)
class Split:
    """The digits dealt to devices, and the held-out test examples no device holds."""

    devices: list[Arrays]
    test: Arrays
    alpha: float
    seed: int

    @property
    def pooled(self) -> Arrays:
        """Every device's examples together: what a central model would train on."""
        return (
            np.concatenate([images for images, _ in self.devices]),
            np.concatenate([labels for _, labels in self.devices]),
        )


def split(n_devices: int, alpha: float = 0.5, seed: int = 0, test_share: float = 0.2) -> Split:
    """The bundled digits: ``test_share`` held out (stratified), the rest dealt to ``n_devices``
    devices with Dirichlet(``alpha``) label skew; the same ``seed`` gives the same split."""
    images, labels = load_digits()
    rest, test = stratified_split(labels, test_share, seed)
    parts = dirichlet_partition(labels[rest], n_devices, alpha, seed + 1)
    return Split(
        devices=[(images[rest[p]], labels[rest[p]]) for p in parts],
        test=(images[test], labels[test]),
        alpha=alpha,
        seed=seed,
    )


def write_split(data: Split, out: Path) -> tuple[list[Path], Path]:
    """``out/devices/device-NN/data.npz`` for each device and ``out/reference.npz`` (the test set)."""
    files = [
        write_npz(out / "devices" / f"device-{i:02d}" / "data.npz", images, labels)
        for i, (images, labels) in enumerate(data.devices)
    ]
    return files, write_npz(out / "reference.npz", *data.test)


def label_counts(labels: np.ndarray) -> list[int]:
    """How many examples of each class 0..9."""
    return [int(n) for n in np.bincount(labels.astype(np.int64), minlength=CLASSES)]


def main(argv: list[str] | None = None) -> None:
    """``python -m digits_cnn``: write device files and the reference file."""
    ap = argparse.ArgumentParser(
        prog="python -m digits_cnn", description="Split scikit-learn's digits across devices by label skew."
    )
    ap.add_argument("--out", type=Path, required=True, help="folder for devices/ and reference.npz")
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration; smaller: more skew")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        data = split(args.devices, args.alpha, args.seed)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    files, reference = write_split(data, args.out)
    for path, (_, labels) in zip(files, data.devices, strict=True):
        print(f"{path}  {labels.size} images, per class {label_counts(labels)}")
    print(f"{reference}  {data.test[1].size} test images")
