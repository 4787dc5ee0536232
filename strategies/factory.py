"""Build the strategy stack from config; the traffic meter stays outermost so it counts what
really crosses the wire:

    plaintext:   TrafficMeter(Workload(DecompressUpdates?(RejectMalformedUpdates(DP wrapper?(base)))))
    secagg=he:   TrafficMeter(Workload(DP wrapper?(HomomorphicAggregation(base))))

Under HE the aggregation layer sits directly on the base strategy (it replaces the base's
aggregation and validates encrypted updates itself); DP layers above it only instruct clients,
ask for noise on the encrypted sum, and account. The DP layer knows the HE layer only as a
`NoisySecureSum` (protections/base.py): this module is where the two are put together.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.common import Metrics, Parameters, Scalar
from flwr.server.strategy import FedAdam, FedAvg, FedAvgM, FedProx, Strategy

from core.config import ExperimentConfig
from core.evaluation import EVAL_BINS_KEY, EVAL_THRESHOLD_KEY, EVALUATE_RECEIVED_KEY
from protections.dp.mechanisms import CLIP_NORM_KEY, LOCAL_NOISE_KEY, make_noise_source
from protections.he.context import HEContext
from protections.dp.server import (
    AdaptiveClipping,
    ClientReportedPrivacy,
    ClientSideFixedClipping,
    EncryptedClientSideClipping,
    ServerSideFixedClipping,
)
from protections.compression.server import DecompressUpdates
from protections.he.server import HomomorphicAggregation
from strategies.traffic import TrafficMeter
from protections.validation.server import RejectMalformedUpdates
from protections.workload.server import Workload

EvaluateFn = Callable[[int, list, dict[str, Scalar]], tuple[float, dict[str, Scalar]] | None]


def weighted_metrics(results: list[tuple[int, Metrics]]) -> Metrics:
    """Example-weighted mean of every numeric metric the clients report.

    Flower's legacy strategies take this as a callback and ship none (only the loss is
    weighted by Flower itself), so it is written here.
    """
    totals: dict[str, float] = {}
    weights: dict[str, int] = {}
    for num_examples, metrics in results:
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            totals[key] = totals.get(key, 0.0) + num_examples * float(value)
            weights[key] = weights.get(key, 0) + num_examples
    return {key: totals[key] / weights[key] for key in totals if weights[key] > 0}


def evaluate_config_fn(cfg: ExperimentConfig) -> Callable[[int], dict[str, Scalar]]:
    """The evaluation instructions: the round, and how clients compute their metrics
    (evaluation.threshold and calibration_bins, so every site reports the same quantities)."""
    threshold, bins = float(cfg.evaluation.threshold), int(cfg.evaluation.calibration_bins)

    def configure(server_round: int) -> dict[str, Scalar]:
        return {"server_round": server_round, EVAL_THRESHOLD_KEY: threshold, EVAL_BINS_KEY: bins}

    return configure


def fit_config_fn(cfg: ExperimentConfig) -> Callable[[int], dict[str, Scalar]]:
    """Per-round instructions the server sends with the model (read by the client's fit).
    With strategy.evaluate_with_train, from round 2 on they also ask each client to evaluate
    the model it receives (the previous round's) first, as evaluate_config_fn would."""
    evaluation = evaluate_config_fn(cfg) if evaluates_with_train(cfg) else None

    def configure(server_round: int) -> dict[str, Scalar]:
        config: dict[str, Scalar] = {
            "server_round": server_round,
            "local_epochs": cfg.training.local_epochs,
            "lr": cfg.training.lr,
        }
        if evaluation is not None and server_round >= 2:
            config.update(evaluation(server_round))
            config[EVALUATE_RECEIVED_KEY] = True
        return config

    return configure


def evaluates_with_train(cfg: ExperimentConfig) -> bool:
    """strategy.evaluate_with_train on a run that has federated evaluation (core/config.py
    refuses it on one that has none)."""
    return cfg.strategy.evaluate_with_train and has_federated_evaluation(cfg)


def build_strategy(
    cfg: ExperimentConfig,
    initial_parameters: Parameters,
    evaluate_fn: EvaluateFn | None,
    he_context: HEContext | None = None,
    he_client_config: dict[str, Scalar] | None = None,
) -> TrafficMeter:
    """`he_context` (secagg=he): the public context; `he_client_config`: extra instructions
    for clients (in simulation, where the run's secret context lies)."""
    s = cfg.strategy
    fraction_evaluate = s.fraction_evaluate if has_federated_evaluation(cfg) else 0.0
    common = dict(
        fraction_fit=s.fraction_train,
        fraction_evaluate=fraction_evaluate,
        min_fit_clients=s.min_train_clients,
        min_evaluate_clients=s.min_evaluate_clients if fraction_evaluate > 0 else 0,
        min_available_clients=s.min_available_clients,
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=fit_config_fn(cfg),
        on_evaluate_config_fn=evaluate_config_fn(cfg),
        accept_failures=True,
        initial_parameters=initial_parameters,
        fit_metrics_aggregation_fn=weighted_metrics,
        evaluate_metrics_aggregation_fn=weighted_metrics,
    )
    base: Strategy
    if s.name == "fedavg":
        base = FedAvg(**common)
    elif s.name == "fedavgm":
        base = FedAvgM(
            **common, server_learning_rate=s.server_learning_rate, server_momentum=s.server_momentum
        )
    elif s.name == "fedprox":
        base = FedProx(**common, proximal_mu=s.proximal_mu)
    elif s.name == "fedadam":
        base = FedAdam(
            **common, eta=s.eta, eta_l=s.eta_l, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau
        )
    else:
        raise ValueError(f"strategy.name={s.name!r}: use fedavg, fedavgm, fedprox or fedadam")
    if cfg.secagg.name == "he":
        if he_context is None:
            raise ValueError("secagg=he needs the server's public HE context")
        he = HomomorphicAggregation(
            base,
            he_context,
            metrics_fn=weighted_metrics,
            client_config=he_client_config,
            max_weight=cfg.secagg.max_weight,
            pairwise_masks=cfg.secagg.pairwise_masks,
            mask_threshold=cfg.secagg.mask_threshold,
        )
        return TrafficMeter(Workload(with_privacy(he, cfg), cfg.workload.name))
    plain = RejectMalformedUpdates(with_privacy(base, cfg))
    if cfg.compression.name != "none":  # under the meter: it counts the compressed bytes
        plain = DecompressUpdates(plain, cfg.compression.name)
    return TrafficMeter(Workload(plain, cfg.workload.name))


def federated_evaluation_allowed(cfg: ExperimentConfig) -> bool:
    """Federated evaluation computes loss and accuracy on the clients' own data and no
    accountant covers it: under DP it runs only when the user opts into unprotected metrics."""
    return cfg.privacy.name == "none" or cfg.privacy.unprotected_metrics


def has_federated_evaluation(cfg: ExperimentConfig) -> bool:
    """Whether the run evaluates on the clients: strategy.fraction_evaluate > 0, clients hold
    a validation split (dataset.val_fraction > 0), and privacy allows its metrics."""
    return cfg.strategy.fraction_evaluate > 0 and cfg.dataset.val_fraction > 0 and federated_evaluation_allowed(cfg)


CLIENT_LEVEL_DP = {
    "server_fixed": ServerSideFixedClipping,
    "client_fixed": ClientSideFixedClipping,
    "adaptive": AdaptiveClipping,
}


def with_privacy(base: Strategy, cfg: ExperimentConfig) -> Strategy:
    """Wrap `base` in the DP layer `privacy.name` asks for (or return it as is)."""
    p = cfg.privacy
    if p.name in CLIENT_LEVEL_DP:
        kwargs = dict(
            noise_multiplier=p.noise_multiplier,
            clipping_norm=p.clipping_norm,
            target_delta=p.target_delta,
            epsilon_budget=p.epsilon_budget,
            sampling=p.accounting,
            noise=make_noise_source(p.noise_seed),
            metrics_fn=weighted_metrics,
            unprotected_metrics=p.unprotected_metrics,
        )
        if p.name == "adaptive":
            kwargs.update(
                target_quantile=p.target_quantile,
                clip_norm_lr=p.clip_norm_lr,
                clipped_count_stddev=p.clipped_count_stddev,
            )
        if isinstance(base, HomomorphicAggregation):
            return EncryptedClientSideClipping(base, **kwargs)  # config allows only client_fixed
        return CLIENT_LEVEL_DP[p.name](base, **kwargs)
    if p.name == "local":
        return ClientReportedPrivacy(
            base,
            target_delta=p.target_delta,
            client_config={CLIP_NORM_KEY: p.clipping_norm, LOCAL_NOISE_KEY: p.noise_multiplier},
            unprotected_metrics=p.unprotected_metrics,
        )
    if p.name == "dpsgd":
        return ClientReportedPrivacy(
            base, target_delta=p.target_delta, unprotected_metrics=p.unprotected_metrics
        )
    return base
