"""Client half of differential privacy, as pipeline steps (protections/client_step.py).

- `BoundUpdate` (privacy=client_fixed | local): clips the update to the norm the server's
  ClientSideFixedClipping or ClientReportedPrivacy sends (`CLIP_NORM_KEY`); under local DP
  (`LOCAL_NOISE_KEY`) it also adds this client's own noise and accounts the release in the
  node's Context state, so the accountant survives the client object being rebuilt.
- `DPSGDTraining` (privacy=dpsgd): trains with Opacus DP-SGD (protections/dp/dpsgd.py),
  its accountant's history likewise kept in the node's Context state.
- `ReleaseOnlyAccounted` (any privacy mode, unless privacy.unprotected_metrics=true): only
  what an accountant covers leaves the client, its epsilon, with weight 1; evaluation on the
  client's data, which no accountant covers, is refused.
"""

from __future__ import annotations

from flwr.common import ConfigRecord, NDArrays

from protections.dp.config import DPConfig, DPSGDConfig
from core.training import TrainResult
from protections.client_step import ClientStep, RoundContext
from protections.dp.mechanisms import (
    CLIP_NORM_KEY,
    EPSILON_METRIC,
    LOCAL_NOISE_KEY,
    UPDATE_NORM_METRIC,
    clip_update,
    l2_norm,
    local_dp_epsilon,
    local_dp_release,
    make_noise_source,
)

# Context.state keys: a client's privacy history survives between rounds there.
LOCAL_DP_STATE = "local_dp"
DPSGD_STATE = "dpsgd_accountant"


class BoundUpdate(ClientStep):
    """Client-side clipping of the update (and, for local DP, this client's own noise)."""

    def __init__(self, privacy: DPConfig) -> None:
        self.noise_seed = privacy.noise_seed  # refused by config unless forced
        self.target_delta = privacy.target_delta

    def transform(self, weights: NDArrays, ctx: RoundContext) -> NDArrays:
        if CLIP_NORM_KEY not in ctx.config:
            return weights
        clipping_norm = float(ctx.config[CLIP_NORM_KEY])
        if ctx.clip_slack is not None:
            clipping_norm -= ctx.clip_slack.norm
            if clipping_norm <= 0:
                raise ValueError(
                    f"privacy.clipping_norm={ctx.config[CLIP_NORM_KEY]} is below {ctx.clip_slack.why}"
                )
        sent = ctx.global_weights
        update = [t - s for t, s in zip(weights, sent)]
        ctx.metrics[UPDATE_NORM_METRIC] = l2_norm(update)
        if LOCAL_NOISE_KEY not in ctx.config:
            update, _ = clip_update(update, clipping_norm)
        else:
            z = float(ctx.config[LOCAL_NOISE_KEY])
            seed = None if self.noise_seed is None else self.noise_seed * 1_000_003 + ctx.seed
            update = local_dp_release(update, clipping_norm, z, make_noise_source(seed))
            releases = self._count_release(ctx)
            ctx.metrics[EPSILON_METRIC] = local_dp_epsilon(z, releases, self.target_delta)
        return [s + u for s, u in zip(sent, update)]

    @staticmethod
    def _count_release(ctx: RoundContext) -> int:
        state = ctx.node_state("local DP accounting")
        releases = int(state[LOCAL_DP_STATE]["releases"]) + 1 if LOCAL_DP_STATE in state else 1
        state[LOCAL_DP_STATE] = ConfigRecord({"releases": releases})
        return releases


class DPSGDTraining(ClientStep):
    """Local training with Opacus DP-SGD instead of the task's plain training."""

    replaces_training = True

    def __init__(self, privacy: DPSGDConfig, max_rounds: int) -> None:
        self.privacy = privacy
        self.max_rounds = max_rounds  # the worst case target_epsilon is spread over

    def train(self, ctx: RoundContext) -> TrainResult:
        # Imported here: Opacus takes about 1.2 s to import, which every client process (each
        # simulation's Ray actors) would otherwise pay at start, DP-SGD or not.
        from protections.dp.dpsgd import HISTORY_KEY, train_dpsgd

        state = ctx.node_state("DP-SGD accounting")
        history = str(state[DPSGD_STATE][HISTORY_KEY]) if DPSGD_STATE in state else "[]"
        result, epsilon, history = train_dpsgd(
            ctx.model,
            ctx.data,
            ctx.training,
            self.privacy,
            ctx.task,
            ctx.device,
            ctx.seed,
            history,
            self.max_rounds,
        )
        state[DPSGD_STATE] = ConfigRecord({HISTORY_KEY: history})
        ctx.metrics[EPSILON_METRIC] = epsilon
        return result


class ReleaseOnlyAccounted(ClientStep):
    """Under any privacy mode, send nothing unaccounted unless the user opted in."""

    def __init__(self, privacy_name: str) -> None:
        self.privacy_name = privacy_name

    def receive(self, parameters: NDArrays, ctx: RoundContext) -> NDArrays:
        if not ctx.fitting:
            raise PermissionError(
                f"federated evaluation under privacy={self.privacy_name} would send loss and "
                "accuracy on this client's data, which no accountant covers: the server does "
                "not ask for it unless privacy.unprotected_metrics=true"
            )
        return parameters

    def transform(self, weights: NDArrays, ctx: RoundContext) -> NDArrays:
        # Only what an accountant covers leaves the client: its epsilon. Loss, accuracy,
        # update norm, step counts and the example count (the FedAvg weight, which under
        # add/remove neighbours reveals membership by itself) stay here; the mean over
        # clients is uniform. privacy.unprotected_metrics=true sends them (not covered).
        ctx.metrics = {k: v for k, v in ctx.metrics.items() if k == EPSILON_METRIC}
        ctx.num_examples = 1
        return weights
