"""SecAgg+ secure aggregation (Bell et al., CCS 2020, over Bonawitz et al., CCS 2017).

Pure functions and small state holders over data: no HTTP, no database. The
coordinator drives :func:`unmask_total` and :func:`finish`; the agent drives a
:class:`SecAggClient` through the stages of the round protocol.
"""

from shared.secagg.graph import neighbour_graph
from shared.secagg.params import SecAggParams, derive_params, modulus_ok
from shared.secagg.primitives import SecAggError
from shared.secagg.protocol import (
    SecAggClient,
    advertise_message,
    decode_share,
    encode_share,
    finish,
    unmask_total,
    verify_advertisement,
    weighted_input,
)
from shared.secagg.quantize import dequantize_weighted_mean, quantisation_bound, quantize

__all__ = [
    "SecAggClient",
    "SecAggError",
    "SecAggParams",
    "advertise_message",
    "decode_share",
    "derive_params",
    "dequantize_weighted_mean",
    "encode_share",
    "finish",
    "modulus_ok",
    "neighbour_graph",
    "quantisation_bound",
    "quantize",
    "unmask_total",
    "verify_advertisement",
    "weighted_input",
]
