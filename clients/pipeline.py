"""Build the client's pipeline of protection steps from config, in one place, the way
strategies/factory.build_strategy builds the server's stack (protections/client_step.py has
the interface: `receive` runs from the wire inwards, `transform` from training outwards).

Both drawn with the wire on the left, `?` where the config decides:

    server stack (outermost first, strategies/factory.py):
      plaintext:  TrafficMeter > Workload > DecompressUpdates? > RejectMalformedUpdates > DP? > base
      secagg=he:  TrafficMeter > Workload > DP? > HomomorphicAggregation > base

    client pipeline (wire first):
      plaintext:  ReleaseOnlyAccounted? > CompressUpdate? > BoundUpdate? > ScaleLocalWork | DPSGDTraining
      secagg=he:  ReleaseOnlyAccounted? > HomomorphicEncryption > BoundUpdate? > ScaleLocalWork | DPSGDTraining

Where the two differ, and why:
- the server's DP layer sits above HomomorphicAggregation (it only instructs, asks for noise on
  the encrypted sum and accounts), but the client clips (`BoundUpdate`) before it encrypts:
  nobody can clip a ciphertext. `HomomorphicEncryption.receive` leaves the clipping step the
  fixed-point rounding slack, so the encrypted update stays within C;
- `ReleaseOnlyAccounted` (any privacy mode without privacy.unprotected_metrics) is outermost:
  it keeps back every metric but the epsilon and reports weight 1 (HE is told to encrypt
  weight 1 too), and on the way in refuses an evaluation before anything is decrypted;
- `ScaleLocalWork` sits next to training (it sets the step budget and reports the capability
  the server's Workload layer reads); under privacy=dpsgd Opacus draws the steps and the
  config refuses workload=capability, so DP-SGD reports no workload metrics and has no step.

The list `build_pipeline` returns is in `transform` order (training side first). For these
configs it is (tests/test_client_pipeline.py checks every row against `build_pipeline`):

    overrides                                         | steps, training side first
    (defaults)                                        | ScaleLocalWork
    workload=capability                               | ScaleLocalWork
    compression=int8                                  | ScaleLocalWork, CompressUpdate
    privacy=server_fixed compression=fp16             | ScaleLocalWork, CompressUpdate, ReleaseOnlyAccounted
    privacy=adaptive                                  | ScaleLocalWork, ReleaseOnlyAccounted
    privacy=client_fixed                              | ScaleLocalWork, BoundUpdate, ReleaseOnlyAccounted
    privacy=client_fixed privacy.unprotected_metrics=true | ScaleLocalWork, BoundUpdate
    privacy=local                                     | ScaleLocalWork, BoundUpdate, ReleaseOnlyAccounted
    privacy=dpsgd                                     | DPSGDTraining, ReleaseOnlyAccounted
    secagg=he                                         | ScaleLocalWork, HomomorphicEncryption
    secagg=he privacy=client_fixed                    | ScaleLocalWork, BoundUpdate, HomomorphicEncryption, ReleaseOnlyAccounted
    secagg=he privacy=dpsgd                           | DPSGDTraining, HomomorphicEncryption, ReleaseOnlyAccounted
"""

from __future__ import annotations

from core.config import ExperimentConfig
from protections.client_step import ClientStep
from protections.compression.client import CompressUpdate
from protections.dp.client import BoundUpdate, DPSGDTraining, ReleaseOnlyAccounted
from protections.workload.client import ScaleLocalWork


def build_pipeline(
    cfg: ExperimentConfig, *, he_secret_context: str | None = None, compute: float = 1.0
) -> list[ClientStep]:
    """The steps of one SuperNode under `cfg`. `he_secret_context`: the node config's path to
    its secret HE context (deployment; in simulation the server names it); `compute`: the
    node's capability in (0, 1] (protections/workload/wire.node_capability)."""
    p = cfg.privacy
    protected = p.name != "none" and not p.unprotected_metrics
    steps: list[ClientStep] = []
    if p.name == "dpsgd":
        steps.append(DPSGDTraining(p, max_rounds=cfg.num_rounds))
    else:
        steps.append(ScaleLocalWork(compute))
    if p.name in ("client_fixed", "local"):  # the modes whose server half sends a clipping norm
        steps.append(BoundUpdate(p))
    if cfg.secagg.name == "he":
        # Imported here: it loads TenSEAL, which only secagg=he uses (a ClientApp process
        # per message pays every import; tests/test_imports.py checks).
        from protections.he.client import HomomorphicEncryption

        steps.append(
            HomomorphicEncryption(
                he_secret_context,
                expect_server_noise=p.name == "client_fixed",
                uniform_weight=protected,
            )
        )
    elif cfg.compression.name != "none":  # config refuses compression under HE
        steps.append(CompressUpdate())
    if protected:
        steps.append(ReleaseOnlyAccounted(p.name))
    return steps
