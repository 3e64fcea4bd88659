"""Distributed differential privacy under SecAgg+: the distributed Skellam mechanism.

Agarwal, Kairouz and Liu, "The Skellam Mechanism for Differentially Private
Federated Learning", NeurIPS 2021. Each device clips its update to L2 norm
``clip``, scales it into integers, rounds it (conditional randomised
rounding, Kairouz, Liu and Steinke, "The Distributed Discrete Gaussian
Mechanism for Federated Learning with Secure Aggregation", ICML 2021,
section 4), and adds its own share of Skellam noise, the difference of two
Poisson draws, before masking. A sum of independent Skellam variables is
Skellam with the summed variance, so the unmasked sum carries exactly
Skellam(sum of the survivors' shares): nobody, the coordinator included,
ever sees the sum without noise, and each share is sized for the fewest
contributors a round can finish with, so the guarantee holds whoever drops.

Signed integers travel modulo 2**64 in two's complement (a uint64 view of
int64); the unmasked sum, read back as int64, is the true signed sum as long
as it stays within [-2**63, 2**63), which ``shared/privacy/modulus.py``
checks before a round runs.

The privacy unit is one device's whole contribution, and the neighbouring
rounds differ by that contribution being zeroed ("zero-out", Kairouz et al.,
ICML 2021): the device still takes part and still adds its noise share, as
the coordinator sees who took part anyway. So every device weighs in with
weight 1 (a data-dependent weight in the clear would leak, and scaling by a
weight cap would multiply the noise by it), and the last coordinate counts
the contributors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from shared.privacy.clipping import clip_l2, under_clip

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]

DEFAULT_BETA = math.exp(-0.5)  # conditional rounding's rejection bound, as in Kairouz et al. (ICML 2021)
_MAX_ROUNDING_TRIES = 1000  # each try passes with probability at least 1 - beta; 1000 failures: ~1e-215


def skellam_noise(variance: float, size: int, rng: np.random.Generator) -> I64:
    """``size`` independent draws of the symmetric Skellam distribution with the given variance.

    Skellam(mu) is Poisson(mu / 2) minus an independent Poisson(mu / 2):
    integer, mean 0, variance mu, and closed under summation, Skellam(a) +
    Skellam(b) = Skellam(a + b) (Agarwal et al., NeurIPS 2021, section 3).
    The noise must be unpredictable to everyone but the device: seed ``rng``
    from the operating system's CSPRNG, e.g.
    ``np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(32))))``.
    """
    if not (math.isfinite(variance) and variance >= 0):
        raise ValueError(f"variance must be a non-negative finite number, got {variance}")
    if variance == 0:
        return np.zeros(size, dtype=np.int64)
    lam = variance / 2.0
    return rng.poisson(lam, size).astype(np.int64) - rng.poisson(lam, size).astype(np.int64)


def rounded_l2_bound(scaled_clip: float, dim: int, beta: float = DEFAULT_BETA) -> float:
    """The L2 norm bound of a vector of norm ``scaled_clip`` after (conditional) randomised rounding to integers.

    Each coordinate moves by less than one, so ``scaled_clip + sqrt(dim)``
    always holds. With ``beta`` > 0 the rounding is redrawn until the norm is
    at most ``sqrt(c**2 + dim / 4 + sqrt(2 ln(1 / beta)) * (c + sqrt(dim) / 2))``,
    which a draw meets with probability at least ``1 - beta`` (Kairouz, Liu
    and Steinke, ICML 2021, Proposition 22): far tighter than the first when
    ``dim`` is large. The smaller of the two is the bound.
    """
    if dim < 1:
        raise ValueError(f"dim must be at least 1, got {dim}")
    if not 0 <= beta < 1:
        raise ValueError(f"beta must lie in [0, 1), got {beta}")
    c, root = float(scaled_clip), math.sqrt(dim)
    bound = c + root
    if beta > 0:
        squared = c * c + dim / 4.0 + math.sqrt(2.0 * math.log(1.0 / beta)) * (c + root / 2.0)
        bound = min(bound, math.sqrt(squared))
    return bound


def randomised_round(values: np.ndarray, bound: float, rng: np.random.Generator) -> I64:
    """Unbiased stochastic rounding to integers, redrawn until the L2 norm is at most ``bound``.

    Conditional randomised rounding (Kairouz et al., ICML 2021, section 4):
    the norm test makes the integer sensitivity a hard bound, not one that
    holds with high probability. The squared norm is summed in float64 with
    a margin for its rounding (at most ``(dim + 1)`` ulps of the sum), so an
    accepted vector's exact norm is within the bound.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    floor = np.floor(x)
    frac = x - floor
    limit = bound * bound * (1.0 - 2.0 * (x.size + 2) * 2.0**-53)
    for _ in range(_MAX_ROUNDING_TRIES):
        out = floor + (rng.random(x.size) < frac)
        if float(np.dot(out, out)) <= limit:
            return out.astype(np.int64)
    raise ValueError(f"no rounding met the norm bound {bound} in {_MAX_ROUNDING_TRIES} tries")


@dataclass(frozen=True)
class SkellamParams:
    """One round's distributed Skellam mechanism: what every device and the accountant must agree on.

    ``clip``: the L2 norm each update is clipped to. ``bits``: the scale, so
    that a value of magnitude ``clip`` becomes ``2**(bits - 1) - 1``
    integer steps (2 to 40). ``dim``: update values per device. ``noise_multiplier``:
    the noise's standard deviation over the integer L2 sensitivity of the
    whole vector (the Gaussian mechanism's z). ``min_contributors``: the
    fewest devices whose masked inputs a round may be unmasked with
    (``cohort.minimum``, less those that may collude with the coordinator,
    :func:`honest_floor`); each device's share is the total variance over
    this, so any larger set of survivors adds more noise, never less.
    ``indicator_noise``: with adaptive clipping, the standard deviation (in
    devices) of the noise on the count of devices under the clip; the bit
    travels as the coordinate ``kappa * (2 b - 1)`` and shares the budget
    (Andrew et al., NeurIPS 2021). ``beta``: conditional rounding's bound.
    """

    clip: float
    bits: int
    dim: int
    noise_multiplier: float
    min_contributors: int
    indicator_noise: float | None = None
    beta: float = DEFAULT_BETA

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a positive finite number, got {self.clip}")
        if not 2 <= self.bits <= 40:
            raise ValueError(f"bits must be between 2 and 40, got {self.bits}")
        if self.dim < 1:
            raise ValueError(f"dim must be at least 1, got {self.dim}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(
                f"noise_multiplier must be a positive finite number, got {self.noise_multiplier}"
            )
        if self.min_contributors < 1:
            raise ValueError(f"min_contributors must be at least 1, got {self.min_contributors}")
        if self.indicator_noise is not None and not (
            math.isfinite(self.indicator_noise) and 2.0 * self.indicator_noise > self.noise_multiplier
        ):
            raise ValueError(
                f"indicator_noise must exceed noise_multiplier / 2 = {self.noise_multiplier / 2}, "
                f"got {self.indicator_noise}: the clip bit would spend the whole budget"
            )
        if not 0 <= self.beta < 1:
            raise ValueError(f"beta must lie in [0, 1), got {self.beta}")

    @property
    def scale(self) -> float:
        """Integer steps per unit of update value."""
        return ((1 << (self.bits - 1)) - 1) / self.clip

    @property
    def update_l2(self) -> float:
        """The L2 norm bound of a device's rounded, scaled update (:func:`rounded_l2_bound`)."""
        return rounded_l2_bound(self.scale * self.clip, self.dim, self.beta)

    @property
    def indicator_scale(self) -> int:
        """kappa: the clip bit travels as ``kappa * (2 b - 1)``; 0 without adaptive clipping.

        Chosen so that the bit count's noise is about ``indicator_noise``:
        with the closed form ``mu0 = z**2 D**2 / (1 - (z / (2 sigma_b))**2)``
        of Andrew et al.'s split, ``kappa = round(sqrt(mu0) / (2 sigma_b))``.
        """
        if self.indicator_noise is None:
            return 0
        z, d, s = self.noise_multiplier, self.update_l2, self.indicator_noise
        mu0 = (z * d) ** 2 / (1.0 - (z / (2.0 * s)) ** 2)
        return max(1, round(math.sqrt(mu0) / (2.0 * s)))

    @property
    def l2_sensitivity(self) -> float:
        """The integer L2 sensitivity of one device's vector: the rounded update and the scaled bit."""
        return math.sqrt(self.update_l2**2 + self.indicator_scale**2)

    @property
    def l1_sensitivity(self) -> float:
        """The integer L1 sensitivity: at most ``sqrt(dim) * D2``, and at most ``D2**2`` for integers, plus kappa."""
        d2 = self.update_l2
        return min(math.sqrt(self.dim) * d2, d2 * d2) + self.indicator_scale

    @property
    def variance(self) -> float:
        """The total noise variance per coordinate, with ``min_contributors`` shares: ``(z * D2)**2``."""
        return (self.noise_multiplier * self.l2_sensitivity) ** 2

    @property
    def local_variance(self) -> float:
        """The variance of one device's noise share: the total over ``min_contributors``."""
        return self.variance / self.min_contributors

    @property
    def indicator_std(self) -> float:
        """The standard deviation of the noise on the count of devices under the clip (with ``min_contributors``)."""
        kappa = self.indicator_scale
        return math.sqrt(self.variance) / (2.0 * kappa) if kappa else 0.0

    @property
    def coordinates(self) -> int:
        """Length of a device's vector: the update, the clip bit (when adaptive), the contributor count."""
        return self.dim + (1 if self.indicator_noise is not None else 0) + 1


def honest_floor(minimum: int, corruption: float) -> int:
    """The devices whose noise a round can count on: ``cohort.minimum`` less those colluding with the coordinator.

    A device that colludes knows its own share and can subtract it, so only
    the honest survivors' shares protect anyone (Kairouz et al., ICML 2021,
    section 5). With a corruption fraction gamma, at least
    ``floor(minimum * (1 - gamma))`` of the ``minimum`` survivors are honest.
    """
    if minimum < 1 or not 0 <= corruption < 1:
        raise ValueError("minimum must be at least 1 and corruption in [0, 1)")
    return max(1, math.floor(minimum * (1.0 - corruption)))


@dataclass(frozen=True, eq=False)
class NoiseShare:
    """One device's Skellam noise share for one round, drawn before its update exists (:func:`noise_share`).

    The share depends only on the round's :class:`SkellamParams`, never on
    the update, so a device may draw it while it waits between SecAgg+
    stages and add it at masked input. It keeps the parameters it was drawn
    for, so that :func:`noised_input` refuses a share of another round's
    mechanism. Use it for one vector only: a share added twice is noise the
    coordinator can cancel by differencing.
    """

    params: SkellamParams
    values: I64


def noise_share(params: SkellamParams, rng: np.random.Generator) -> NoiseShare:
    """A device's Skellam(``params.local_variance``) share for every coordinate but the contributor count.

    Exactly the draw :func:`noised_input` makes when given no share, and the
    first thing it takes from ``rng``: drawing the share ahead and passing it
    gives the same vector, to the bit, as letting :func:`noised_input` draw
    it from the same generator. ``rng`` must be seeded from a CSPRNG
    (:func:`skellam_noise`) and fresh for each round.
    """
    return NoiseShare(params, skellam_noise(params.local_variance, params.coordinates - 1, rng))


def _checked_share(noise: NoiseShare, params: SkellamParams) -> I64:
    if not isinstance(noise, NoiseShare):
        raise ValueError(
            f"the noise share must be a NoiseShare from noise_share(), got {type(noise).__name__}"
        )
    if noise.params != params:
        raise ValueError(f"the noise share was drawn for {noise.params}, this round's mechanism is {params}")
    values = noise.values
    if (
        not isinstance(values, np.ndarray)
        or values.dtype != np.int64
        or values.shape != (params.coordinates - 1,)
    ):
        got = (
            f"{values.dtype} of shape {values.shape}"
            if isinstance(values, np.ndarray)
            else type(values).__name__
        )
        raise ValueError(f"the noise share must be {params.coordinates - 1} int64 values, got {got}")
    return values


def noised_input(
    update: np.ndarray, params: SkellamParams, rng: np.random.Generator, noise: NoiseShare | None = None
) -> U64:
    """A device's vector for SecAgg+: its clipped, scaled, rounded update plus its noise share, as uint64.

    Steps, each from the papers: clip to ``params.clip`` in L2
    (:func:`clip_l2`); scale by ``params.scale``; conditional randomised
    rounding to norm ``params.update_l2``; with adaptive clipping, append
    ``kappa * (2 b - 1)`` where b is 1 when the update's norm was at most
    this round's clip (:func:`under_clip`); add an independent
    Skellam(``params.local_variance``) share to every one of those
    coordinates; append 1, the contributor count. Signed values go into the
    uint64 vector in two's complement, so the masked sum modulo 2**64 is the
    signed sum. ``rng`` must be seeded from a CSPRNG (:func:`skellam_noise`).

    ``noise``: the share drawn ahead with :func:`noise_share` for these
    ``params`` (a device draws it while it waits between stages); without
    it the share is drawn here, first, from ``rng``. A share for other
    parameters, or not of ``coordinates - 1`` int64 values, is refused with
    a ValueError.
    """
    values = np.asarray(update).ravel()
    if values.size != params.dim:
        raise ValueError(f"update has {values.size} values, the round expects dim={params.dim}")
    share = _checked_share(noise, params) if noise is not None else noise_share(params, rng).values
    clipped = clip_l2(values, params.clip)
    rounded = randomised_round(clipped.values * params.scale, params.update_l2, rng)
    signed = np.empty(params.coordinates, dtype=np.int64)
    signed[: params.dim] = rounded
    if params.indicator_noise is not None:
        signed[params.dim] = params.indicator_scale * (2 * under_clip(clipped.norm, params.clip) - 1)
    signed[:-1] += share
    signed[-1] = 1
    return signed.view(np.uint64)


@dataclass(frozen=True)
class NoisedSum:
    """The decoded unmasked sum: the noised sum of the clipped updates, the contributors, the noised share under the clip."""

    total: npt.NDArray[np.float64]
    contributors: int
    fraction_under: float | None


def decode_total(total: np.ndarray, params: SkellamParams) -> NoisedSum:
    """Read the unmasked uint64 sum of :func:`noised_input` vectors back as signed integers, in update units.

    The sum of the updates is the int64 reading over ``params.scale``; the
    contributors are the last coordinate; with adaptive clipping the noised
    fraction under the clip is ``(S / kappa + n) / (2 n)`` for the bit
    coordinate S (Andrew et al.'s ``b``, to feed :meth:`QuantileClip.next`).
    Divide ``total`` by the contributors (or by the expected cohort, which
    hides their number) for the mean.
    """
    vec = np.asarray(total)
    if vec.dtype != np.uint64 or vec.shape != (params.coordinates,):
        raise ValueError(f"the unmasked sum must be {params.coordinates} uint64 values")
    signed = vec.view(np.int64)
    contributors = int(signed[-1])
    if contributors < 1:
        raise ValueError(f"the unmasked sum counts {contributors} contributors")
    fraction = None
    if params.indicator_noise is not None:
        bits_sum = float(signed[params.dim]) / params.indicator_scale
        fraction = (bits_sum + contributors) / (2.0 * contributors)
    return NoisedSum(signed[: params.dim].astype(np.float64) / params.scale, contributors, fraction)
