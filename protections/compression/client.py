"""Client half of update compression (protections/compression/wire.py): a pipeline step
(protections/client_step.py) that sends the quantized update instead of the model when the
server's DecompressUpdates (protections/compression/server.py) asks for a scheme."""

from __future__ import annotations

import numpy as np
from flwr.common import NDArrays

from protections.client_step import ClientStep, RoundContext
from protections.compression.wire import COMPRESSION_KEY, compress_update


class CompressUpdate(ClientStep):
    def transform(self, weights: NDArrays, ctx: RoundContext) -> NDArrays:
        if COMPRESSION_KEY not in ctx.config:
            return weights
        # Stochastic rounding from the round's public seed: the rounding hides nothing.
        rng = np.random.default_rng(ctx.seed)
        return compress_update(ctx.global_weights, weights, str(ctx.config[COMPRESSION_KEY]), rng)
