"""Server side of HE secure aggregation: add ciphertexts the server can never read.

`HomomorphicAggregation` wraps the base strategy (FedAvg or FedProx: their sampling and
client instructions stay theirs) and replaces only the aggregation:

1. every encrypted update is checked against what this round expects (algorithm, key
   fingerprint, tensor layout, round, weight, ciphertext count) and each ciphertext is
   deserialized with the *public* context, which SEAL validates; a mismatch or a malformed,
   truncated or foreign ciphertext is rejected with a log line naming the node, and the round
   goes on with the others (NVFlare's HE aggregator `accept()` does the same checks);
2. the accepted ciphertexts are summed (BFV addition: no key needed);
3. with client-level DP, calibrated Gaussian noise is added to the encrypted sum as a plaintext
   (ct + pt), see `EncryptedClientSideClipping` in dp_client_level.py;
4. the sum travels back as the next global model, with the total weight in the clear; clients
   decrypt and divide by it. The server never holds a secret key, so it never decrypts:
   centralized evaluation is impossible after round 1 (federated evaluation reports instead),
   and the final model is saved encrypted.
"""

from __future__ import annotations

import json
from logging import ERROR, INFO, WARNING
from typing import Any

import numpy as np
import tenseal.sealapi as seal
from flwr.common import Parameters, bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log

from app.he_context import (
    ALGORITHM,
    HE_ROUND_KEY,
    HE_WEIGHTING_KEY,
    HEContext,
    HEError,
    is_payload_header,
    layout_hash,
    load_ciphertext,
    num_ciphertexts,
    pack_payload,
    payload_header,
    seal_to_bytes,
    unpack_payload,
)
from app.privacy import NormalSource
from strategies.wrapper import StrategyWrapper


def encrypted_header(parameters: Parameters) -> dict | None:
    """The payload header if `parameters` is an HE payload (reads only the small header
    tensor, not the ciphertexts), else None."""
    if len(parameters.tensors) != 2:
        return None
    header = bytes_to_ndarray(parameters.tensors[0])
    return json.loads(header.tobytes()) if is_payload_header(header) else None


class HomomorphicAggregation(StrategyWrapper):
    def __init__(
        self,
        strategy,
        context: HEContext,
        *,
        metrics_fn=None,
        client_config: dict | None = None,
        uniform_weights: bool = False,
    ) -> None:
        super().__init__(strategy)
        if context.is_secret:
            raise HEError(
                "HomomorphicAggregation was given a secret context: the server must load "
                "only the public context (public.ctx)"
            )
        self.context = context
        self.metrics_fn = metrics_fn
        self.client_config = dict(client_config or {})
        # FedAvg weighs by examples; client-level DP needs every client to count once.
        self.uniform_weights = uniform_weights
        # Set per round by a DP layer above: std of the Gaussian added to the sum (model units).
        self.sum_noise_std = 0.0
        self.noise: NormalSource | None = None
        self._layout: tuple[str, int] | None = None  # (layout hash, number of values)
        self._reports: dict[int, dict[str, Any]] = {}
        self.aggregated: dict[int, int] = {}
        self.rejected: dict[int, list[str]] = {}
        self.rejections: dict[int, list[tuple[str, str]]] = {}

    def __repr__(self) -> str:
        return f"HomomorphicAggregation({ALGORITHM}, {self.context.params}, {self.strategy!r})"

    # ------------------------------------------------------------------ sending
    def _remember_layout(self, parameters: Parameters) -> None:
        header = encrypted_header(parameters)
        if header is not None:
            self._layout = (header["layout"], int(header["num_values"]))
        else:
            arrays = parameters_to_ndarrays(parameters)
            self._layout = (layout_hash([a.shape for a in arrays]), sum(a.size for a in arrays))

    def _instructions(self, server_round: int) -> dict:
        return {
            HE_ROUND_KEY: server_round,
            HE_WEIGHTING_KEY: "uniform" if self.uniform_weights else "examples",
            **self.client_config,
        }

    def configure_fit(self, server_round, parameters, client_manager):
        self._remember_layout(parameters)
        instructions = super().configure_fit(server_round, parameters, client_manager)
        for _, ins in instructions:
            ins.config.update(self._instructions(server_round))
        return instructions

    def configure_evaluate(self, server_round, parameters, client_manager):
        instructions = super().configure_evaluate(server_round, parameters, client_manager)
        for _, ins in instructions:
            ins.config.update(self._instructions(server_round))
        return instructions

    def evaluate(self, server_round, parameters):
        """Centralized evaluation only of a plaintext model (the initial one)."""
        if encrypted_header(parameters) is not None:
            return None
        return super().evaluate(server_round, parameters)

    # ------------------------------------------------------------------ aggregation
    def check_update(self, server_round: int, res) -> tuple[int, list[seal.Ciphertext]]:
        """(weight, ciphertexts) of a valid update; HEError says why one is not."""
        if self._layout is None:
            raise HEError("no model was sent this round")
        layout, num_values = self._layout
        try:
            arrays = parameters_to_ndarrays(res.parameters)
        except Exception as err:  # noqa: BLE001 - any undecodable payload is malformed
            raise HEError(f"undecodable payload ({type(err).__name__}: {err})") from err
        header, ciphertexts = unpack_payload(arrays)
        expected_weight = 1 if self.uniform_weights else res.num_examples
        checks = [
            ("algorithm", header.get("algorithm"), ALGORITHM),
            ("key fingerprint", header.get("context"), self.context.fingerprint),
            ("kind", header.get("kind"), "update"),
            ("round", header.get("round"), server_round),
            ("tensor layout", header.get("layout"), layout),
            ("number of values", header.get("num_values"), num_values),
            ("scale_bits", header.get("scale_bits"), self.context.params.scale_bits),
            ("weight", header.get("weight"), expected_weight),
            ("ciphertexts", len(ciphertexts), num_ciphertexts(num_values, self.context.slots)),
        ]
        for what, got, want in checks:
            if got != want:
                raise HEError(f"{what} is {got!r}, expected {want!r}")
        if expected_weight <= 0:
            raise HEError(f"weight {expected_weight} must be > 0")
        return expected_weight, [load_ciphertext(self.context, c) for c in ciphertexts]

    def aggregate_fit(self, server_round, results, failures):
        failures = list(failures)
        accepted: list[tuple[int, list[seal.Ciphertext], Any]] = []
        bytes_up = 0
        for proxy, res in results:
            try:
                weight, ciphertexts = self.check_update(server_round, res)
            except HEError as err:
                log(
                    WARNING,
                    "Round %s: rejected encrypted update of node %s: %s",
                    server_round,
                    proxy.cid,
                    err,
                )
                self.rejected.setdefault(server_round, []).append(f"node {proxy.cid}: {err}")
                self.rejections.setdefault(server_round, []).append((str(proxy.cid), str(err)))
                failures.append(err)
                continue
            accepted.append((weight, ciphertexts, res))
            bytes_up += sum(len(t) for t in res.parameters.tensors)
        if not accepted:
            log(WARNING, "Round %s: no valid encrypted update; the model is kept", server_round)
            return None, {}
        divisor = sum(weight for weight, _, _ in accepted)
        limit = self.context.params.max_total_weight(self.context.plain_modulus)
        if divisor > limit:
            log(
                ERROR,
                "Round %s skipped: the total weight %d of %d clients exceeds %d, the most the "
                "plaintext modulus holds at secagg.scale_bits=%d and max_abs_value=%g; raise "
                "secagg.plain_modulus_bits or lower secagg.scale_bits",
                server_round,
                divisor,
                len(accepted),
                limit,
                self.context.params.scale_bits,
                self.context.params.max_abs_value,
            )
            return None, {}
        total = self._sum([ciphertexts for _, ciphertexts, _ in accepted])
        layout, num_values = self._layout
        if self.sum_noise_std > 0:
            self._add_noise(total, num_values)
        header = payload_header(
            self.context, "aggregate", layout, num_values, server_round, divisor=divisor
        )
        payload = pack_payload(header, [seal_to_bytes(ct) for ct in total])
        self.aggregated[server_round] = len(accepted)
        self._reports[server_round] = {
            "scheme": ALGORITHM,
            "clients_aggregated": len(accepted),
            "ciphertexts_per_model": len(total),
            "bytes_per_parameter_up": bytes_up / (len(accepted) * num_values),
            "bytes_per_parameter_down": int(payload[1].size + payload[0].size) / num_values,
        }
        metrics = {}
        if self.metrics_fn is not None:
            metrics = self.metrics_fn([(res.num_examples, res.metrics) for _, _, res in accepted])
        log(
            INFO,
            "Round %s: summed %d encrypted updates (%d ciphertexts each), divisor %d",
            server_round,
            len(accepted),
            len(total),
            divisor,
        )
        return ndarrays_to_parameters(payload), metrics

    def _sum(self, updates: list[list[seal.Ciphertext]]) -> list[seal.Ciphertext]:
        evaluator = self.context.evaluator
        total = []
        for parts in zip(*updates):
            acc = seal.Ciphertext()
            evaluator.add_many(list(parts), acc)
            total.append(acc)
        return total

    def _add_noise(self, total: list[seal.Ciphertext], num_values: int) -> None:
        """Add round(scale * N(0, std^2)) to every real (non-padding) value of the sum.
        The sum is an integer in units of 1/scale, so this equals rounding the continuous
        Gaussian mechanism's output: post-processing, the DP guarantee is unchanged."""
        if self.noise is None:
            raise HEError("sum noise requested without a noise source")
        scale = self.context.params.scale
        slots = self.context.slots
        noise = np.zeros(len(total) * slots, dtype=np.int64)
        noise[:num_values] = np.rint(
            scale * np.asarray(self.noise.normal(0.0, self.sum_noise_std, (num_values,)))
        ).astype(np.int64)
        encoder, evaluator = self.context.encoder, self.context.evaluator
        for ct, chunk in zip(total, noise.reshape(len(total), slots)):
            plain = seal.Plaintext()
            encoder.encode(chunk.tolist(), plain)
            evaluator.add_plain_inplace(ct, plain)

    def rejected_updates(self, server_round: int) -> list[tuple[str, str]]:
        return self.rejections.get(server_round, []) + super().rejected_updates(server_round)

    def round_report(self, server_round: int) -> dict[str, Any]:
        report = super().round_report(server_round)
        secagg = dict(self._reports.get(server_round, {"scheme": ALGORITHM}))
        if self.rejected.get(server_round):
            secagg["rejected"] = self.rejected[server_round]
        report["secagg"] = secagg
        return report
