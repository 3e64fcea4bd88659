"""Gradient and hessian histograms of one tree level: computed on a device, encoded for SecAgg+, checked.

At each level the open nodes of the round's trees are numbered as *slots*.
A device sums, per (slot, feature, bin), the gradients and hessians of its
rows in that slot (:func:`level_histogram`), and counts its rows per slot.
XGBoost's ``hist`` method needs nothing else to choose the splits, and the
coordinator needs only the sum over devices: that is what SecAgg+ yields.

Encoding (:func:`encode`): sums become fixed-point integers with
:data:`SCALE` steps per unit, in two's complement modulo 2**64, followed by
the row counts. The modular sum of the devices' encodings is the encoding of
the sum, hence :func:`decode` returns the float sum, as long as no total
leaves ``(-2**63, 2**63)``. :func:`encode` guarantees that for a cohort of
``devices``: it refuses a device whose scaled value reaches ``2**62 / devices``
in magnitude, so the cohort's total stays below ``2**62``. With logistic or
softmax gradients (|g| <= 1, h <= 1 per row) that allows ``2**38 / devices``
rows per device (2.7e8 with 1,000 devices). Squared error has no such bound:
standardise the target (the tabular preprocessor does). Each device's
rounding moves a value by at most half a step, so a decoded sum is within
``devices / (2 * SCALE)`` of the float sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.gbdt.objectives import GRADIENT_BOUNDED, HESSIAN_MAX

SCALE = 2**24
_HEADROOM = 2**62


class HistogramError(ValueError):
    """A histogram that cannot be used; ``reason`` names the problem in one word, ``str()`` says more.

    Reasons: ``shape``, ``non_finite``, ``too_large``, ``negative_hessian``,
    ``negative_rows``, ``rows_exceed``, ``features_disagree``,
    ``hessian_bound``, ``gradient_bound``. The engine drops the device that
    sent it from the level.
    """

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.reason, self.detail))


@dataclass(frozen=True, eq=False)
class LevelHistogram:
    """Sums of one level: ``grad`` and ``hess`` float64 ``(slots, features, width)``, ``rows`` int64 ``(slots,)``.

    The last bin of each feature (index ``width - 1``) holds the rows whose
    value is missing.
    """

    grad: np.ndarray
    hess: np.ndarray
    rows: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        s, f, w = self.grad.shape
        return int(s), int(f), int(w)

    def node_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """Each slot's gradient and hessian totals (every row sits in one bin of feature 0)."""
        return self.grad[:, 0, :].sum(axis=1), self.hess[:, 0, :].sum(axis=1)


def level_histogram(
    codes: np.ndarray, slots: np.ndarray, grad: np.ndarray, hess: np.ndarray, n_slots: int, width: int
) -> LevelHistogram:
    """A device's histogram of one level (the device's step).

    ``codes``: bin codes ``(rows, features)``; ``slots``: int ``(rows, trees)``,
    each row's slot in each tree, -1 where it sits in a finished leaf;
    ``grad``/``hess``: ``(rows, trees)``. One ``np.bincount`` per tree and
    quantity over flat (slot, feature, bin) keys.
    """
    n, features = codes.shape
    if slots.shape != grad.shape or grad.shape != hess.shape or slots.shape[0] != n:
        raise ValueError(f"slots {slots.shape}, grad {grad.shape}, hess {hess.shape} for {n} rows")
    cells = n_slots * features * width
    offsets = codes.astype(np.int64) + np.arange(features, dtype=np.int64) * width
    g_total = np.zeros(cells)
    h_total = np.zeros(cells)
    rows = np.zeros(n_slots, dtype=np.int64)
    for t in range(slots.shape[1]):
        open_rows = np.flatnonzero(slots[:, t] >= 0)
        if open_rows.size == 0:
            continue
        slot = slots[open_rows, t].astype(np.int64)
        keys = (offsets[open_rows] + (slot * (features * width))[:, None]).ravel()
        g_total += np.bincount(keys, weights=np.repeat(grad[open_rows, t], features), minlength=cells)
        h_total += np.bincount(keys, weights=np.repeat(hess[open_rows, t], features), minlength=cells)
        rows += np.bincount(slot, minlength=n_slots)
    shape = (n_slots, features, width)
    return LevelHistogram(grad=g_total.reshape(shape), hess=h_total.reshape(shape), rows=rows)


def vector_size(n_slots: int, features: int, width: int) -> int:
    """The length of an encoded level histogram: gradients, hessians, then one row count per slot."""
    return 2 * n_slots * features * width + n_slots


def encode(hist: LevelHistogram, devices: int) -> np.ndarray:
    """The histogram as the uint64 vector a device masks (fixed point, two's complement).

    Raises :class:`HistogramError` (``non_finite``, ``too_large``) for sums
    that the cohort's total could not hold; see the module's bound.
    """
    if devices < 1:
        raise ValueError(f"devices must be at least 1, got {devices}")
    sums = np.concatenate([hist.grad.ravel(), hist.hess.ravel()])
    if not np.isfinite(sums).all():
        raise HistogramError("non_finite", "the histogram holds NaN or infinite sums")
    limit = _HEADROOM // devices
    scaled = np.rint(sums * SCALE)
    largest = float(np.abs(scaled).max(initial=0.0))
    if largest >= limit:
        raise HistogramError(
            "too_large",
            f"a sum of {largest / SCALE:g} exceeds the {limit / SCALE:g} that {devices} devices can add safely",
        )
    return np.concatenate([scaled.astype(np.int64), hist.rows.astype(np.int64)]).view(np.uint64)


def decode(total: np.ndarray, n_slots: int, features: int, width: int) -> LevelHistogram:
    """The summed histogram from the modular sum of the devices' :func:`encode` vectors (or one device's).

    Raises :class:`HistogramError` (``shape``) for a vector of another length.
    """
    t = np.asarray(total)
    expected = vector_size(n_slots, features, width)
    if t.dtype != np.uint64 or t.ndim != 1 or t.size != expected:
        raise HistogramError("shape", f"expected {expected} uint64 values, got {t.size} of {t.dtype}")
    ints = t.view(np.int64)
    cells = n_slots * features * width
    shape = (n_slots, features, width)
    return LevelHistogram(
        grad=(ints[:cells] / SCALE).reshape(shape),
        hess=(ints[cells : 2 * cells] / SCALE).reshape(shape),
        rows=ints[2 * cells :].copy(),
    )


def check_histogram(
    hist: LevelHistogram,
    *,
    n_slots: int,
    features: int,
    width: int,
    objective: str,
    rows: int | None = None,
    trees: int = 1,
    devices: int = 1,
) -> None:
    """Refuse a histogram that no honest device (or cohort) could have sent; :class:`HistogramError` names why.

    ``rows``: the row count the sender declared in the statistics round (the
    cohort's total for a summed histogram), each row sitting in one slot of
    each of the round's ``trees`` at most; ``devices``: how many encodings
    were summed, which sets the rounding allowed. Checks, in order: shape;
    finite sums; hessians and row counts not negative; no more rows than
    declared; each feature's bins of a slot adding up to the same totals
    (every row sits in one bin of every feature); the slot's hessian within
    what its rows can give under ``objective`` (exactly one per row for
    squared error) and, for classification, its absolute gradient at most
    its rows.
    """
    expected = (n_slots, features, width)
    if hist.grad.shape != expected or hist.hess.shape != expected or hist.rows.shape != (n_slots,):
        raise HistogramError(
            "shape",
            f"expected sums of shape {expected} and {n_slots} row counts, "
            f"got {hist.grad.shape}, {hist.hess.shape} and {hist.rows.shape}",
        )
    if not (np.isfinite(hist.grad).all() and np.isfinite(hist.hess).all()):
        raise HistogramError("non_finite", "the histogram holds NaN or infinite sums")
    step = devices / SCALE  # the rounding of one decoded sum, doubled for slack
    if (hist.hess < -step).any():
        raise HistogramError("negative_hessian", "a hessian sum is negative")
    if (hist.rows < 0).any():
        raise HistogramError("negative_rows", "a slot's row count is negative")
    if rows is not None and int(hist.rows.sum()) > rows * trees:
        raise HistogramError(
            "rows_exceed", f"{int(hist.rows.sum())} rows in the level, at most {rows * trees} possible"
        )
    g_feature = hist.grad.sum(axis=2)
    h_feature = hist.hess.sum(axis=2)
    slack = width * step + 1e-9 * (
        1.0 + np.abs(h_feature).max(initial=0.0) + np.abs(g_feature).max(initial=0.0)
    )
    if (np.ptp(g_feature, axis=1) > slack).any() or (np.ptp(h_feature, axis=1) > slack).any():
        raise HistogramError(
            "features_disagree", "a slot's bins add up to different totals in different features"
        )
    node_g, node_h = g_feature[:, 0], h_feature[:, 0]
    count = hist.rows.astype(np.float64)
    if objective == "reg:squarederror":
        if (np.abs(node_h - count) > slack).any():
            raise HistogramError("hessian_bound", "a slot's hessian is not its row count (squared error)")
    elif (node_h > HESSIAN_MAX[objective] * count + slack).any():
        raise HistogramError("hessian_bound", f"a slot's hessian exceeds {HESSIAN_MAX[objective]} per row")
    if objective in GRADIENT_BOUNDED and (np.abs(node_g) > count + slack).any():
        raise HistogramError("gradient_bound", "a slot's absolute gradient exceeds its row count")
