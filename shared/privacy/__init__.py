"""Differential privacy composed with SecAgg+: clipping, noise, the wrap-around bound, accounting, settings.

Pure functions and small frozen dataclasses over data, as ``shared/secagg``
is; docs/privacy.md tells the mechanisms and why the accounting is an upper
bound. The accountant (``shared.privacy.accounting``) needs the
``dp-accounting`` package and is imported on its own, so that a device,
which only clips and adds noise, does not need it.
"""

from shared.privacy.central import add_central_noise, central_noise_std
from shared.privacy.clipping import (
    Clipped,
    QuantileClip,
    clip_l2,
    l2_norm,
    under_clip,
    update_noise_multiplier,
)
from shared.privacy.modulus import WrapBound, check_no_wrap, noise_bound, skellam_tail, wrap_bound
from shared.privacy.settings import PrivacySettings, PrivacySettingsError, validate_privacy
from shared.privacy.skellam import (
    NoisedSum,
    SkellamParams,
    decode_total,
    honest_floor,
    noised_input,
    randomised_round,
    rounded_l2_bound,
    skellam_noise,
)

__all__ = [
    "Clipped",
    "NoisedSum",
    "PrivacySettings",
    "PrivacySettingsError",
    "QuantileClip",
    "SkellamParams",
    "WrapBound",
    "add_central_noise",
    "central_noise_std",
    "check_no_wrap",
    "clip_l2",
    "decode_total",
    "honest_floor",
    "l2_norm",
    "noise_bound",
    "noised_input",
    "randomised_round",
    "rounded_l2_bound",
    "skellam_noise",
    "skellam_tail",
    "under_clip",
    "update_noise_multiplier",
    "validate_privacy",
    "wrap_bound",
]
