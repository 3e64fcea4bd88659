"""Central differential privacy: Gaussian noise the coordinator adds to the plaintext aggregate.

For jobs without SecAgg+ (``secure = false``). This TRUSTS THE COORDINATOR:
it sees every device's update in the clear before it adds the noise, so the
guarantee protects devices only from those who see the released model (other
devices, whoever downloads it), never from the coordinator or anyone who
reads its memory or database. Under SecAgg+ use the distributed mechanism
(``shared/privacy/skellam.py``) instead, where nobody sees an un-noised sum.

The mechanism is DP-FedAvg's (McMahan, Ramage, Talwar and Zhang, "Learning
Differentially Private Recurrent Language Models", ICLR 2018): every update
clipped to L2 norm ``clip`` (:func:`shared.privacy.clipping.clip_l2`), summed
with weight 1, and ``N(0, (noise_multiplier * clip)**2)`` added to each
coordinate of the sum: the Gaussian mechanism with L2 sensitivity ``clip``
under adding or removing (or zeroing) one device's update, which is what
``shared/privacy/accounting.py`` accounts.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt


def central_noise_std(clip: float, noise_multiplier: float) -> float:
    """The standard deviation of the noise on each coordinate of the sum: ``noise_multiplier * clip``."""
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be a positive finite number, got {clip}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be a positive finite number, got {noise_multiplier}")
    return noise_multiplier * clip


def add_central_noise(
    clipped_sum: np.ndarray, clip: float, noise_multiplier: float, rng: np.random.Generator
) -> npt.NDArray[np.float64]:
    """``clipped_sum + N(0, (noise_multiplier * clip)**2)`` per coordinate, as a new float64 array.

    ``clipped_sum`` must be the sum, with weight 1 each, of updates clipped
    to ``clip``: the noise is calibrated to that sensitivity and to nothing
    else. Seed ``rng`` from the operating system's CSPRNG. Floating-point
    Gaussian samples are not exactly Gaussian (Mironov, CCS 2012, shows the
    attack on Laplace); the accounting ignores this, as DP-SGD libraries do.
    """
    std = central_noise_std(clip, noise_multiplier)
    total = np.asarray(clipped_sum, dtype=np.float64)
    if not np.isfinite(total).all():
        raise ValueError("the clipped sum holds non-finite values (NaN or infinity)")
    return total + rng.normal(0.0, std, total.shape)
