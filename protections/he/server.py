"""Server side of HE secure aggregation: add ciphertexts the server can never read.

`HomomorphicAggregation` wraps the base strategy (FedAvg or FedProx: their sampling and
client instructions stay theirs) and replaces only the aggregation:

1. every encrypted update is checked against what this round expects (algorithm, key
   fingerprint, tensor layout, round, weight <= secagg.max_weight, ciphertext count) and each
   ciphertext is deserialized with the *public* context and validated (SEAL's checks plus
   the NTT flag, size, level, scale: `load_ciphertext`); a ciphertext whose seed was seen
   before (a replay from an earlier round, or a duplicate in this one) is refused, and so is a
   client whose weight would overflow the plaintext modulus. Each refusal is recorded with
   the node and the reason (`rejected_updates`) and the round goes on with the others; no
   client input raises out of `aggregate_fit` (anything unexpected rejects that client);
2. the accepted ciphertexts are summed (BFV addition: no key needed), client by client, so
   a ciphertext that still fails to add rejects its client only; with pairwise masks
   (secagg.pairwise_masks, the default) the survivors' leftover masks are then reconstructed
   from their Shamir shares and subtracted (protections/he/masks.py: two get_properties
   round trips in `configure_fit`, one here); below the threshold the round is recorded as
   failed and the model kept;
3. with client-level DP, calibrated Gaussian noise is added to the encrypted sum as a plaintext
   (ct + pt): the DP layer above asks for it through the `NoisySecureSum` interface this class
   implements (protections/base.py; the DP side is `EncryptedClientSideClipping` in
   protections/dp/server.py);
4. the sum travels back as the next global model, with the total weight in the clear; clients
   decrypt and divide by it. The server never holds a secret key, so it never decrypts:
   centralized evaluation is impossible after round 1 (federated evaluation reports instead),
   and the final model is saved encrypted.
5. key holders check each aggregate they decrypt (MAC, decrypted weight, range: see
   protections/he/client.py `check_aggregate`) and report a failure as a fit metric instead of
   an update. When most of a round's clients report the model they received bad, this layer
   rolls back: the round's result is the last global model the clients accepted, so one bad
   round (a tampered sum, an overflow, a weight lie) costs one round, and it is recorded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from logging import ERROR, INFO, WARNING
from typing import Any

import numpy as np
import tenseal.sealapi as seal
from flwr.common import Parameters, bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log

from protections.he.context import (
    ALGORITHM,
    BAD_AGGREGATE_METRIC,
    PAYLOAD_ALGORITHM,
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
    seed_id,
    unpack_payload,
)
from core.result_types import RollbackReport, SecAggReport
from protections.he import masks
from protections.base import NormalSource, StrategyWrapper


def encrypted_header(parameters: Parameters) -> dict | None:
    """The payload header if `parameters` is an HE payload (reads only the small header
    tensor, not the ciphertexts), else None."""
    if len(parameters.tensors) != 2:
        return None
    header = bytes_to_ndarray(parameters.tensors[0])
    return json.loads(header.tobytes()) if is_payload_header(header) else None


class HomomorphicAggregation(StrategyWrapper):
    """The secure sum (a `NoisySecureSum`, protections/base.py) of the HE stack."""

    section = "secagg"

    def __init__(
        self,
        strategy,
        context: HEContext,
        *,
        metrics_fn=None,
        client_config: dict | None = None,
        uniform_weights: bool = False,
        max_weight: int = 100_000,
        pairwise_masks: bool = False,
        mask_threshold: int = 0,
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
        limit = context.params.max_total_weight(context.plain_modulus)
        if not 1 <= int(max_weight) <= limit:
            raise HEError(f"secagg.max_weight={max_weight} must be in [1, {limit}] (the total the plaintext modulus holds)")
        self.max_weight = int(max_weight)
        self.pairwise_masks = pairwise_masks
        self.mask_threshold = int(mask_threshold)  # 0: ceil(2n/3) of each round's cohort
        self._cohorts: dict[int, dict[str, Any]] = {}  # round -> the mask cohort (masks.py)
        self.mask_failures: dict[int, str] = {}  # round -> why its masks could not be removed
        self._seen: dict[bytes, int] = {}  # seed id -> the round it was summed in
        self._sent: dict[int, Parameters] = {}  # the global model sent each round
        self._last_good: Parameters | None = None  # the latest model clients accepted
        self.rollbacks: dict[int, dict[str, Any]] = {}
        # Set by a DP layer above (noise_next_sum): std of the Gaussian added to the sum
        # (model units) and where it is drawn.
        self.sum_noise_std = 0.0
        self.noise: NormalSource | None = None
        self._layout: tuple[str, int] | None = None  # (layout hash, number of values)
        self._reports: dict[int, SecAggReport] = {}
        self.aggregated: dict[int, int] = {}
        self.rejected: dict[int, list[str]] = {}
        self.rejections: dict[int, list[tuple[str, str]]] = {}

    def __repr__(self) -> str:
        return f"HomomorphicAggregation({ALGORITHM}, {self.context.params}, {self.strategy!r})"

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs from this layer (app/checkpoint.py): the fingerprint of
        the keys the checkpointed model is encrypted under, every seed already summed (so an
        update replayed from before the restart is still refused) and the last global model
        the clients accepted (what a rollback restores). Per-round bookkeeping (mask cohorts,
        reports) ends with its round and is not kept."""
        state = super().state_dict()
        last_good = None if self._last_good is None else parameters_to_ndarrays(self._last_good)
        state["he"] = {
            "context": self.context.fingerprint,
            "seen": sorted([seed.hex(), r] for seed, r in self._seen.items()),
            "last_good": last_good,
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        he = state["he"]
        if he["context"] != self.context.fingerprint:
            raise HEError(
                f"the checkpoint is encrypted under the HE keys with fingerprint {he['context']}, "
                f"this run has keys {self.context.fingerprint}: resume with the first run's keys "
                "(secagg.public_context, or in simulation the run's keys/ folder)"
            )
        super().load_state_dict(state)
        self._seen = {bytes.fromhex(seed): int(r) for seed, r in he["seen"]}
        last_good = he["last_good"]
        self._last_good = None if last_good is None else ndarrays_to_parameters(list(last_good))

    # ------------------------------------------------------------------ NoisySecureSum
    def count_each_client_once(self) -> None:
        self.uniform_weights = True

    def noise_next_sum(self, std: float, source: NormalSource) -> None:
        self.sum_noise_std, self.noise = float(std), source

    def clients_summed(self, server_round: int) -> int:
        return self.aggregated.get(server_round, 0)

    # ------------------------------------------------------------------ sending
    def _remember_layout(self, parameters: Parameters) -> None:
        header = encrypted_header(parameters)
        if header is not None:
            self._layout = (header["layout"], int(header["num_values"]))
        else:
            arrays = self.global_model.arrays(parameters)
            self._layout = (layout_hash([a.shape for a in arrays]), sum(a.size for a in arrays))

    def _instructions(self, server_round: int) -> dict:
        return {
            HE_ROUND_KEY: server_round,
            HE_WEIGHTING_KEY: "uniform" if self.uniform_weights else "examples",
            **self.client_config,
        }

    def configure_fit(self, server_round, parameters, client_manager):
        self._remember_layout(parameters)
        self._sent[server_round] = parameters
        for old in [r for r in self._sent if r < server_round - 2]:
            del self._sent[old]
        instructions = super().configure_fit(server_round, parameters, client_manager)
        for _, ins in instructions:
            ins.config.update(self._instructions(server_round))
        if self.pairwise_masks:
            instructions = self._mask_cohort(server_round, instructions)
        return instructions

    def _ask(self, proxy, server_round: int, config: dict) -> dict:
        from flwr.common import GetPropertiesIns

        res = proxy.get_properties(GetPropertiesIns({**config, masks.MASK_ROUND_KEY: server_round}), None, server_round)
        return dict(res.properties)

    def _ask_all(self, proxies: list, server_round: int, config: dict) -> list:
        """`_ask` every proxy at once, as Flower's own `fit_clients` sends fit instructions (a
        thread per node; the Grid sends and waits on each node's message independently): one
        protocol step costs one round trip instead of one per node (5 nodes in simulation, 1M
        parameters: advertise + share 2.54 -> 0.41 s per round, unmask 0.69 -> 0.30 s;
        benchmarks/secure_aggregation.py). Each answer, or the exception that
        node's call raised, in the order of `proxies`."""
        from concurrent.futures import ThreadPoolExecutor

        def one(proxy):
            try:
                return self._ask(proxy, server_round, config)
            except Exception as err:  # noqa: BLE001 - the caller records it against the node
                return err

        if not proxies:
            return []
        with ThreadPoolExecutor(max_workers=min(32, len(proxies))) as pool:
            return list(pool.map(one, proxies))

    def _mask_cohort(self, server_round, instructions):
        """Steps 1 and 2 of the mask protocol (protections/he/masks.py): collect each sampled
        node's keys of this round, name the cohort and the threshold to all and collect their
        sealed shares; the fit instructions then carry the members that shared and each
        member's inbox. A node that does not answer is left out (recorded)."""
        advertised = []
        answers = self._ask_all([proxy for proxy, _ in instructions], server_round, {masks.MASK_STAGE_KEY: "advertise"})
        for (proxy, ins), res in zip(instructions, answers, strict=True):
            try:
                if isinstance(res, Exception):
                    raise res
                keys = [str(res[masks.SHARE_PK_PROPERTY]), str(res[masks.MASK_PK_PROPERTY])]
                if any(len(bytes.fromhex(k)) != 32 for k in keys):
                    raise ValueError("a key is not 32 bytes")
            except Exception as err:  # noqa: BLE001 - a node's answer is client input
                self._reject(server_round, str(proxy.cid), HEError(f"left out of the mask cohort: no keys ({err})"))
                continue
            advertised.append((proxy, ins, keys))
        flat = [k for _, _, keys in advertised for k in keys]
        if len(set(flat)) != len(flat):
            return self._no_mask_round(server_round, "two nodes announced the same mask key")
        n = len(advertised)
        threshold = masks.threshold_for(n, self.mask_threshold)
        if n < 2 or threshold > n:
            return self._no_mask_round(server_round, f"a mask cohort of {n} cannot meet the threshold {threshold}")
        peers = [keys for _, _, keys in advertised]
        ask = {masks.MASK_STAGE_KEY: "share", masks.PEERS_KEY: json.dumps(peers), masks.THRESHOLD_KEY: threshold}
        sealed, commits = {}, {}
        answers = self._ask_all([proxy for proxy, _, _ in advertised], server_round, ask)
        for i, ((proxy, _, _), res) in enumerate(zip(advertised, answers, strict=True)):
            try:
                if isinstance(res, Exception):
                    raise res
                messages = json.loads(str(res[masks.SHARES_PROPERTY]))
                commit = str(res[masks.COMMIT_PROPERTY])
                if not isinstance(messages, list) or len(messages) != n or len(bytes.fromhex(commit)) != 32:
                    raise ValueError("malformed shares")
            except Exception as err:  # noqa: BLE001 - a node's answer is client input
                self._reject(server_round, str(proxy.cid), HEError(f"left out of the mask cohort: no shares ({err})"))
                continue
            sealed[i], commits[i] = messages, commit
        members = sorted(sealed)
        if len(members) < threshold:
            return self._no_mask_round(server_round, f"{len(members)} of {n} nodes shared, the threshold is {threshold}")
        self._cohorts = {r: c for r, c in self._cohorts.items() if r >= server_round - 1}
        self._cohorts[server_round] = {
            "peers": peers, "threshold": threshold, "members": members, "commits": commits,
            "index": {str(advertised[i][0].cid): i for i in members},
        }  # fmt: skip
        from flwr.common import FitIns

        out = []
        for j in members:
            proxy, shared_ins, _ = advertised[j]
            ins = FitIns(shared_ins.parameters, dict(shared_ins.config))  # base strategies share one
            ins.config[masks.PEERS_KEY] = ask[masks.PEERS_KEY]
            ins.config[masks.MEMBERS_KEY] = json.dumps(members)
            ins.config[masks.INBOX_KEY] = json.dumps({str(i): str(sealed[i][j]) for i in members if i != j})
            out.append((proxy, ins))
        return out

    def _no_mask_round(self, server_round: int, why: str):
        log(ERROR, "Round %s: no masked round: %s", server_round, why)
        self.mask_failures[server_round] = why
        self._reports[server_round] = SecAggReport(scheme=PAYLOAD_ALGORITHM, skipped=f"masks: {why}")
        return []

    def _unmask(self, server_round: int, total: list, accepted: list) -> str | None:
        """Step 4: ask the survivors for the b-shares of the survivors and the s-shares of the
        members that dropped, reconstruct, and subtract what the survivors' masks leave in the
        sum (ct - pt mod t). Returns why that is impossible, or None when done."""
        cohort = self._cohorts[server_round]
        peers, threshold, index = cohort["peers"], cohort["threshold"], cohort["index"]
        survivors = sorted(index[str(entry[3][0].cid)] for entry in accepted)
        dropped = [j for j in cohort["members"] if j not in survivors]
        if len(survivors) < threshold:
            return f"{len(survivors)} of {len(cohort['members'])} masked nodes survived, the threshold is {threshold}"
        ask = {masks.MASK_STAGE_KEY: "unmask", masks.SURVIVORS_KEY: json.dumps(survivors)}
        b_shares: dict[int, list[bytes]] = {i: [] for i in survivors}
        s_shares: dict[int, list[bytes]] = {j: [] for j in dropped}
        answered = 0
        answers = self._ask_all([entry[3][0] for entry in accepted], server_round, ask)
        for entry, res in zip(accepted, answers, strict=True):
            proxy = entry[3][0]
            try:
                if isinstance(res, Exception):
                    raise res
                got_b = json.loads(str(res[masks.B_SHARES_PROPERTY]))
                got_s = json.loads(str(res[masks.S_SHARES_PROPERTY]))
                b = {i: bytes.fromhex(got_b[str(i)]) for i in survivors}
                s = {j: bytes.fromhex(got_s[str(j)]) for j in dropped}
            except Exception as err:  # noqa: BLE001 - a node's answer is client input
                log(WARNING, "Round %s: node %s sent no unmask shares (%s)", server_round, proxy.cid, err)
                continue
            answered += 1
            for i, share in b.items():
                b_shares[i].append(share)
            for j, share in s.items():
                s_shares[j].append(share)
        if answered < threshold:
            return f"{answered} survivors sent their shares, the threshold is {threshold}"
        try:
            seeds = []
            for i in survivors:
                try:
                    seed = masks.reconstruct(b_shares[i], threshold)
                except HEError as err:
                    raise HEError(f"member {i}'s self-mask seed does not reconstruct (bad shares: {err})") from err
                if hashlib.sha256(seed).hexdigest() != cohort["commits"][i]:
                    raise HEError(f"member {i}'s self-mask seed does not reconstruct (bad shares: not its commitment)")
                seeds.append(seed)
            gone = []
            for j in dropped:
                try:
                    private = masks.reconstruct(s_shares[j], threshold)
                except HEError as err:
                    raise HEError(f"dropped member {j}'s mask key does not reconstruct (bad shares: {err})") from err
                if masks.public_key(private).hex() != peers[j][1]:
                    raise HEError(f"dropped member {j}'s mask key does not reconstruct (bad shares: not its public key)")
                gone.append((private, bytes.fromhex(peers[j][1])))
        except HEError as err:
            return str(err)
        layout, num_values = self._layout
        leftover = masks.correction(
            self.context, server_round, layout, num_values, seeds, gone, [bytes.fromhex(peers[i][1]) for i in survivors]
        )
        slots = self.context.slots
        padded = np.zeros(len(total) * slots, dtype=np.uint64)
        padded[: leftover.size] = leftover
        encoder, evaluator = self.context.encoder, self.context.evaluator
        for ct, chunk in zip(total, padded.reshape(len(total), slots)):
            plain = seal.Plaintext()
            encoder.encode(chunk.tolist(), plain)
            evaluator.sub_plain_inplace(ct, plain)
        log(INFO, "Round %s: masks removed (%d survivors, %d dropped)", server_round, len(survivors), len(dropped))
        return None

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
    def open_ciphertexts(self, server_round: int, res) -> tuple[int, list[seal.Ciphertext], list[bytes]]:
        """(weight, ciphertexts, their seed ids) of a valid update; HEError says why not."""
        if self._layout is None:
            raise HEError("no model was sent this round")
        layout, num_values = self._layout
        try:
            arrays = parameters_to_ndarrays(res.parameters)
        except Exception as err:  # noqa: BLE001 - any undecodable payload is malformed
            raise HEError(f"undecodable payload ({type(err).__name__}: {err})") from err
        header, ciphertexts = unpack_payload(arrays)
        expected_weight = 1 if self.uniform_weights else res.num_examples
        if not isinstance(header, dict):
            raise HEError("payload header is not a JSON object")
        claimed = header.get("weight")
        if type(claimed) is not int or claimed <= 0:
            raise HEError(f"weight {claimed!r} is not a positive integer")
        if claimed > self.max_weight:
            raise HEError(f"claimed weight {claimed} exceeds secagg.max_weight={self.max_weight}")
        checks = [
            ("algorithm", header.get("algorithm"), PAYLOAD_ALGORITHM),
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
        loaded = [load_ciphertext(self.context, c) for c in ciphertexts]
        ids = [seed_id(ct) for ct in loaded]
        if len(set(ids)) != len(ids):
            raise HEError("the same ciphertext (seed) appears twice in this update")
        for i in ids:
            if i in self._seen:
                raise HEError(
                    f"replayed ciphertext: its seed was already summed in round {self._seen[i]}"
                )
        return claimed, loaded, ids

    def _reject(self, server_round: int, cid: str, err: Exception) -> None:
        why = str(err) if isinstance(err, HEError) else f"{type(err).__name__}: {err}"
        log(WARNING, "Round %s: rejected encrypted update of node %s: %s", server_round, cid, why)
        self.rejected.setdefault(server_round, []).append(f"node {cid}: {why}")
        self.rejections.setdefault(server_round, []).append((str(cid), why))

    def aggregate_fit(self, server_round, results, failures):
        """Never raises on client input: each bad update, report or addition rejects its node."""
        failures = list(failures)
        accepted: list[tuple[int, list[seal.Ciphertext], Any, Any]] = []
        reports: list[tuple[Any, str]] = []
        round_ids: set[bytes] = set()
        limit = self.context.params.max_total_weight(self.context.plain_modulus)
        total_weight = bytes_up = 0
        for proxy, res in results:
            cid = str(getattr(proxy, "cid", "?"))
            try:
                metrics = res.metrics if isinstance(res.metrics, dict) else {}
                if BAD_AGGREGATE_METRIC in metrics:
                    reports.append((proxy, str(metrics[BAD_AGGREGATE_METRIC])[:500]))
                    continue
                cohort = self._cohorts.get(server_round) if self.pairwise_masks else None
                if cohort is not None and cid not in cohort["index"]:
                    raise HEError("not a member of this round's mask cohort")
                weight, ciphertexts, ids = self.open_ciphertexts(server_round, res)
                if round_ids.intersection(ids):
                    raise HEError("duplicate ciphertext: another update of this round has its seed")
                if total_weight + weight > limit:
                    raise HEError(
                        f"weight {weight} would bring the round's total to {total_weight + weight}"
                        f", beyond {limit}, the most the plaintext modulus holds (raise "
                        "secagg.plain_modulus_bits or lower secagg.max_weight)"
                    )
            except Exception as err:  # noqa: BLE001 - no client input may abort the round
                self._reject(server_round, cid, err)
                failures.append(err)
                continue
            round_ids.update(ids)
            total_weight += weight
            accepted.append((weight, ciphertexts, res, (proxy, ids)))
            bytes_up += sum(len(t) for t in res.parameters.tensors)
        if reports and 2 * len(reports) > len(results):
            return self._rollback(server_round, reports, accepted)
        for proxy, why in reports:  # a minority: those nodes' own problem (or a lie)
            self._reject(server_round, str(proxy.cid), HEError(f"refused the global model: {why}"))
        total, accepted = self._sum(server_round, accepted)
        if not accepted:
            log(WARNING, "Round %s: no valid encrypted update; the model is kept", server_round)
            self._reports[server_round] = SecAggReport(scheme=PAYLOAD_ALGORITHM, skipped="no valid encrypted update")
            return None, {}
        if self.pairwise_masks and server_round in self._cohorts:
            why = self._unmask(server_round, total, accepted)
            if why is not None:  # a clean failure: recorded, the model is kept
                self._no_mask_round(server_round, why)
                self.aggregated[server_round] = 0
                return None, {}
        for _, _, _, (_, ids) in accepted:
            self._seen.update(dict.fromkeys(ids, server_round))
        divisor = sum(weight for weight, _, _, _ in accepted)
        layout, num_values = self._layout
        noised = self.sum_noise_std > 0
        if noised:
            self._add_noise(total, num_values)
        header = payload_header(
            self.context, "aggregate", layout, num_values, server_round, divisor=divisor, noised=noised
        )
        payload = pack_payload(header, [seal_to_bytes(ct) for ct in total])
        self._last_good = self._sent.get(server_round)  # the clients trained from it
        self.aggregated[server_round] = len(accepted)
        self._reports[server_round] = SecAggReport(
            scheme=PAYLOAD_ALGORITHM,
            clients_aggregated=len(accepted),
            ciphertexts_per_model=len(total),
            bytes_per_parameter_up=bytes_up / (len(accepted) * num_values),
            bytes_per_parameter_down=int(payload[1].size + payload[0].size) / num_values,
        )
        metrics = {}
        if self.metrics_fn is not None:
            try:
                metrics = self.metrics_fn([(res.num_examples, res.metrics) for _, _, res, _ in accepted])
            except Exception as err:  # noqa: BLE001 - client metrics are client input
                log(WARNING, "Round %s: client metrics not aggregated (%s)", server_round, err)
        log(
            INFO,
            "Round %s: summed %d encrypted updates (%d ciphertexts each), divisor %d",
            server_round,
            len(accepted),
            len(total),
            divisor,
        )
        return ndarrays_to_parameters(payload), metrics

    def _rollback(self, server_round, reports, accepted):
        """Most clients refused the model they were sent: return the last model they accepted
        (its aggregate, or the initial model), recorded; the refused model costs one round."""
        for proxy, why in reports:
            self._reject(server_round, str(proxy.cid), HEError(f"refused the global model: {why}"))
        for _, _, _, (proxy, _) in accepted:  # trained from the refused model
            self._reject(server_round, str(proxy.cid), HEError("discarded: trained from the refused model (rollback)"))
        target = self._last_good
        record = {
            "reports": len(reports),
            "of_clients": len(reports) + len(accepted),
            "reason": reports[0][1],
            "restored": "the last accepted global model" if target is not None else "none kept",
        }
        self.rollbacks[server_round] = record
        self.aggregated[server_round] = 0
        self._reports[server_round] = SecAggReport(
            scheme=PAYLOAD_ALGORITHM, rolled_back=RollbackReport(**record)
        )
        log(ERROR, "Round %s: %d of %d clients refused the global model (%s): rolled back",
            server_round, len(reports), record["of_clients"], record["reason"])  # fmt: skip
        if target is None:
            return None, {}
        self._remember_layout(target)
        return target, {}

    def _sum(self, server_round, accepted):
        """Sum client by client: a client whose ciphertexts SEAL still refuses to add is
        rejected (recorded) and the sum goes on without it."""
        evaluator = self.context.evaluator
        total: list[seal.Ciphertext] | None = None
        kept = []
        for entry in accepted:
            ciphertexts, (proxy, _) = entry[1], entry[3]
            try:
                if total is None:  # the first: probe that SEAL adds it (x + x), keep x
                    for ct in ciphertexts:
                        evaluator.add(ct, ct, seal.Ciphertext())
                    trial = list(ciphertexts)
                else:
                    trial = []
                    for acc, ct in zip(total, ciphertexts, strict=True):
                        out = seal.Ciphertext()
                        evaluator.add(acc, ct, out)
                        trial.append(out)
            except Exception as err:  # noqa: BLE001 - SEAL's refusal of this client's input
                self._reject(server_round, str(proxy.cid), HEError(f"ciphertexts do not add ({err})"))
                continue
            total = trial
            kept.append(entry)
        return total or [], kept

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

    def rolled_back(self, server_round: int) -> bool:
        return server_round in self.rollbacks

    def rejected_updates(self, server_round: int) -> list[tuple[str, str]]:
        return self.rejections.get(server_round, []) + super().rejected_updates(server_round)

    def report(self, server_round: int) -> SecAggReport:
        summed = self._reports.get(server_round)
        report = SecAggReport(scheme=ALGORITHM) if summed is None else replace(summed)
        report.rejected = list(self.rejected[server_round]) if self.rejected.get(server_round) else None
        return report
