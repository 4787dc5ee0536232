"""Server side of compressed updates: ask for them, dequantize them before anything else.

`DecompressUpdates` sits directly under the traffic meter, so `comm.bytes_up` counts the
compressed arrays exactly as they arrived; every layer below (malformed-update checks, DP
clipping, the base strategy's aggregation) sees float32 models, rebuilt as the global model
this round sent plus the dequantized update (format: protections/compression/wire.py). An update that does
not decode is moved to the failures with a log line naming the node, and the round goes on.
"""

from __future__ import annotations

from dataclasses import replace
from logging import WARNING

from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log

from protections.compression.wire import COMPRESSION_KEY, SCHEMES, CompressionError, decompress_update
from core.result_types import CompressionReport
from protections.base import StrategyWrapper, payload_bytes


class DecompressUpdates(StrategyWrapper):
    section = "compression"

    def __init__(self, strategy, scheme: str) -> None:
        super().__init__(strategy)
        if scheme not in SCHEMES:
            raise ValueError(f"compression={scheme!r}: use one of {', '.join(SCHEMES)}")
        self.scheme = scheme
        self._sent: dict[int, list] = {}
        self._reports: dict[int, CompressionReport] = {}
        self._rejections: dict[int, list[tuple[str, str]]] = {}

    def __repr__(self) -> str:
        return f"DecompressUpdates({self.scheme}, {self.strategy!r})"

    def configure_fit(self, server_round, parameters, client_manager):
        self._sent = {server_round: self.global_model.arrays(parameters)}
        instructions = super().configure_fit(server_round, parameters, client_manager)
        for _, ins in instructions:
            ins.config[COMPRESSION_KEY] = self.scheme
        return instructions

    def aggregate_fit(self, server_round, results, failures):
        sent = self._sent.get(server_round)
        if sent is None:
            return super().aggregate_fit(server_round, results, failures)
        decoded, failures = [], list(failures)
        received = uncompressed = 0
        for proxy, res in results:
            try:
                model = decompress_update(sent, parameters_to_ndarrays(res.parameters), self.scheme)
            except (CompressionError, ValueError) as err:
                log(WARNING, "Round %s: rejected compressed update of node %s: %s", server_round, proxy.cid, err)
                failures.append(err)
                self._rejections.setdefault(server_round, []).append((str(proxy.cid), str(err)))
                continue
            full = ndarrays_to_parameters(model)
            received += payload_bytes(res.parameters)
            uncompressed += payload_bytes(full)
            decoded.append((proxy, replace(res, parameters=full)))
        if decoded:
            self._reports[server_round] = CompressionReport(
                scheme=self.scheme,
                bytes_up=received,
                bytes_up_float32=uncompressed,
                ratio=uncompressed / received,
            )
        return super().aggregate_fit(server_round, decoded, failures)

    def rejected_updates(self, server_round: int) -> list[tuple[str, str]]:
        return self._rejections.get(server_round, []) + super().rejected_updates(server_round)

    def report(self, server_round: int) -> CompressionReport | None:
        return self._reports.get(server_round)
