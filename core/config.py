"""Compose an experiment from `conf/` with Hydra, validate it, and hand out typed values.

Config is read once, at the edge: the ServerApp, the ClientApp and the sweep CLI
all call :func:`load_config` with the same override strings and get the same typed
:class:`ExperimentConfig`. Nothing below this module digs in a dict.

Validation happens in three layers, all before any training:
1. Hydra itself rejects an unknown group option (``model=foo``) and lists the available ones,
   and rejects unknown keys (the composed config is in struct mode).
2. Merging into the dataclass schemas below rejects wrong types (``num_rounds=abc``) and keys
   that a group file added but the schema does not know.
3. :func:`_check_values` rejects values that have the right type but cannot work
   (``training.optimizer=rmsprop``, ``strategy.fraction_train=0``, a label-skew partitioner on
   a regression data set), naming the key and what to use instead; :func:`check_ranges` the
   numbers that would train garbage or crash later (``training.lr=inf``, ``momentum=-1``,
   ``hidden_sizes=[0]``, ``min_train_clients`` above the federation, ...). Keys a ``+key=``
   override adds to a schema are refused (:func:`_check_known_keys`): Hydra accepts them and
   the dataclass would drop them silently.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
CONFIG_NAME = "config"


class ConfigError(ValueError):
    """A bad experiment configuration: the message names the key and the fix."""


# --------------------------------------------------------------------------- schemas
@dataclass
class DatasetConfig:
    name: str = "digits"
    # sklearn: ships inside scikit-learn; synthetic: generated; hub: Flower Datasets / HF hub
    source: str = "sklearn"
    task: str = "classification"  # classification | regression
    test_fraction: float = 0.2  # held by the server for centralized evaluation
    val_fraction: float = 0.1  # each client's validation split
    # synthetic linear regression y = slope * x + intercept + N(0, noise_std^2)
    n_samples: int = 1000
    slope: float = 2.0
    intercept: float = 1.0
    noise_std: float = 0.1
    # hub data sets (need the network)
    hub_name: str = ""
    feature_key: str = "image"
    label_key: str = "label"
    max_samples: int = 0  # 0: all
    # Share of the clients' pool held out as a public split that no client holds: what
    # `python -m app.pretrain` trains the pretrained checkpoint on (local data sets only).
    public_fraction: float = 0.0


@dataclass
class PartitionerConfig:
    name: str = "iid"  # iid | dirichlet | pathological
    alpha: float = 0.5  # Dirichlet concentration: smaller -> more label skew
    min_partition_size: int = 10
    self_balancing: bool = False
    classes_per_partition: int = 2  # pathological


@dataclass
class LoraConfig:
    """LoRA adapters through peft (core/finetune.py; needs the `lora` extra)."""

    r: int = 0  # LoRA rank; 0: no adapters
    alpha: float = 8.0  # peft's lora_alpha: the adapter's output is scaled by alpha / r
    target: str = "all"  # all (every Linear layer) | Linear module names, comma separated


@dataclass
class ModelConfig:
    name: str = "mlp"  # linear | mlp | cnn
    hidden_sizes: list[int] = field(default_factory=lambda: [64])
    channels: list[int] = field(default_factory=lambda: [16, 32])
    # Fine-tuning (core/finetune.py): a checkpoint of `python -m app.pretrain` to start from,
    # and which tensors train and travel: all | head (the last Linear layer) | module names,
    # comma separated (e.g. 'features.2,head.0'); the others stay frozen and are never sent.
    pretrained: str | None = None
    trainable: str = "all"
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class CompressionConfig:
    """Compressed client updates on the plaintext path (protections/compression/wire.py)."""

    name: str = "none"  # none | fp16 | int8


@dataclass
class WorkloadConfig:
    """Local work per client (protections/workload/wire.py). `uniform`: every client runs the configured
    epochs; `capability`: a client with compute c in (0, 1] runs round(c * steps) steps.
    A SuperNode declares `compute` in its node config; in simulation node i gets
    capabilities[i % len(capabilities)]."""

    name: str = "uniform"  # uniform | capability
    capabilities: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25])


@dataclass
class StrategyConfig:
    name: str = "fedavg"  # fedavg | fedavgm | fedprox | fedadam
    fraction_train: float = 0.5  # share of clients sampled for training each round
    fraction_evaluate: float = 0.5  # share sampled for federated evaluation
    min_train_clients: int = 2
    min_evaluate_clients: int = 2
    min_available_clients: int = 2
    proximal_mu: float = 0.0  # fedprox
    server_learning_rate: float = 1.0  # fedavgm
    server_momentum: float = 0.0  # fedavgm
    eta: float = 0.01  # fedadam server lr
    eta_l: float = 0.01  # fedadam client lr (reported by Flower only)
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-9


@dataclass
class PrivacyConfig:
    """Differential privacy. Client level: server_fixed | client_fixed | adaptive | local;
    sample level: dpsgd (Opacus). See protections/dp/server.py and protections/dp/dpsgd.py."""

    name: str = "none"
    noise_multiplier: float = 1.0  # z: noise std = z * clipping norm (dpsgd: * max_grad_norm)
    clipping_norm: float = 1.0  # C: L2 bound of a client's update (adaptive: initial value)
    target_delta: float = 1e-5
    epsilon_budget: float | None = None  # stop before a round that would exceed it
    # How clients are sampled and accounted (protections/dp/accounting.py): poisson (each
    # client joins with q = m/N; add/remove neighbours) | without_replacement (exactly m;
    # replace-one neighbours). auto: poisson, or without_replacement under secagg=he.
    accounting: str = "auto"
    # null: noise from the OS CSPRNG (the default). An int makes every noise draw reproducible
    # from the config, i.e. no privacy against anyone who reads it: refused unless forced.
    noise_seed: int | None = None
    allow_reproducible_noise: bool = False  # tests and benchmarks only
    # Send/record metrics that no accountant covers (train loss, update norms, example counts,
    # clipped counts, federated evaluation on the clients' data). Named in results'
    # privacy.not_covered when on.
    unprotected_metrics: bool = False
    # adaptive clipping (Andrew et al. 2021)
    target_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float | None = None  # null: sampled clients / 20 (Flower's default)
    # dpsgd (sample level, Opacus)
    max_grad_norm: float = 1.0  # per-sample gradient clipping
    # Each example joins a DP-SGD step with this probability (int(1/q) steps per epoch; the
    # noised sum is divided by training.batch_size): public, so nothing released depends on
    # a client's data-set size except through the clipped gradients.
    sample_rate: float = 0.1
    target_epsilon: float | None = None  # per client over the whole run; sets the noise


@dataclass
class SecAggConfig:
    """Secure aggregation. `he`: BFV homomorphic encryption (TenSEAL's SEAL API); the server
    adds ciphertexts it cannot decrypt. See protections/he/context.py for the parameters and why."""

    name: str = "none"  # none | he
    poly_modulus_degree: int = 4096  # N: values per ciphertext
    coeff_mod_bit_sizes: list[int] = field(default_factory=lambda: [56])  # one prime suffices
    plain_modulus_bits: int = 40  # t: must hold the sum of pre-weighted quantized values
    scale_bits: int = 16  # fixed-point scale 2^16: weighted-mean error <= 0.5 / 2^16
    max_abs_value: float = 8.0  # clients refuse to encrypt a model value beyond this
    # The most one client may weigh (its example count under FedAvg); a claim above it rejects
    # that client. 100,000 x 10 clients fits the default plaintext modulus (2^20 in total).
    max_weight: int = 100_000
    # Collusion resistance: clients add pairwise masks (X25519 + ChaCha20) that cancel in the
    # sum; one get_properties round trip per round collects the cohort's keys.
    pairwise_masks: bool = False
    # Deployment: key files (simulation provisions fresh keys into <output_dir>/keys).
    public_context: str | None = None  # the server's context (no secret key)


@dataclass
class TrainingConfig:
    local_epochs: int = 3
    batch_size: int = 16
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    device: str = "auto"  # auto | cpu | cuda
    torch_threads: int = 1  # per training process; 0 keeps torch's default
    # Data-parallel local training (clients/ddp.py): world_size processes train one client's
    # step with DistributedDataParallel; batch_size stays the client's global batch.
    world_size: int = 1
    ddp_backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    ddp_timeout_s: float = 1800.0  # a client's whole DDP fit; workers are killed past it
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a GradScaler, CUDA only)


@dataclass
class SimulationConfig:
    """How `python -m app.sweep` launches `flwr run` (under a plain `flwr run .` these
    values come from `--federation-config`; the ServerApp warns when they differ)."""

    num_supernodes: int = 10
    # null: follow the training config (see client_resources): world_size processes of
    # max(1, torch_threads) CPUs each, and one GPU per process with training.device=cuda.
    client_cpus: int | None = None
    client_gpus: float | None = None


@dataclass
class ExperimentConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    partitioner: PartitionerConfig = field(default_factory=PartitionerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    num_rounds: int = 10
    seed: int = 0
    output_dir: str | None = None
    # Continue the run in output_dir from its last checkpoint (app/checkpoint.py).
    resume: bool = False


def _register_schema() -> None:
    """Make `ExperimentConfig` the base of conf/config.yaml (its first default): every key of the
    schema exists in the composed config even where no group file names it, and Hydra checks
    types while composing."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=ExperimentConfig)


SCHEMA_NAME = "experiment_schema"
_register_schema()

CHOICES: dict[str, tuple[str, ...]] = {
    "dataset.source": ("sklearn", "synthetic", "hub"),
    "dataset.task": ("classification", "regression"),
    "partitioner.name": ("iid", "dirichlet", "pathological"),
    "model.name": ("linear", "mlp", "cnn"),
    "strategy.name": ("fedavg", "fedavgm", "fedprox", "fedadam"),
    "privacy.name": ("none", "server_fixed", "client_fixed", "adaptive", "local", "dpsgd"),
    "privacy.accounting": ("auto", "poisson", "without_replacement"),
    "secagg.name": ("none", "he"),
    "training.optimizer": ("sgd", "adam"),
    "training.device": ("auto", "cpu", "cuda"),
    "training.ddp_backend": ("auto", "gloo", "nccl"),
    "training.precision": ("fp32", "bf16", "fp16"),
    "compression.name": ("none", "fp16", "int8"),
    "workload.name": ("uniform", "capability"),
}


# --------------------------------------------------------------------------- loading
def parse_overrides(overrides: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Split the `overrides` run-config string into Hydra overrides.

    Whitespace separates overrides except inside quotes or brackets, and quotes are kept for
    Hydra's own grammar: `output_dir='/runs/my run' model.hidden_sizes=[64, 32]` gives two
    overrides. (shlex would strip the quotes Hydra needs; Flower's run-config parser accepts
    no escaped quotes, so the string cannot carry two layers of quoting.)
    """
    if overrides is None:
        return ()
    if not isinstance(overrides, str):
        return tuple(overrides)
    tokens, current, quote, depth, escaped = [], [], "", 0, False
    for char in overrides:
        if escaped:  # the character after a backslash inside quotes (Hydra's \' and \\)
            escaped = False
        elif quote and char == "\\":
            escaped = True
        elif quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char.isspace() and depth == 0:
            if current:
                tokens.append("".join(current))
                current = []
            continue
        current.append(char)
    if quote or depth:
        raise ConfigError(
            f"Cannot parse overrides {overrides!r}: unbalanced "
            f"{'quote ' + quote if quote else 'brackets'}"
        )
    if current:
        tokens.append("".join(current))
    return tuple(tokens)


def compose(overrides: str | list[str] | tuple[str, ...] | None = None) -> DictConfig:
    """Compose `conf/config.yaml` with Hydra overrides (no validation against schemas)."""
    return _compose_cached(parse_overrides(overrides))


@lru_cache(maxsize=32)
def _compose_cached(overrides: tuple[str, ...]) -> DictConfig:
    # Imported here: hydra is heavy and only needed when composing.
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_explain(err, overrides)) from err
    return cfg


def load_config(overrides: str | list[str] | tuple[str, ...] | None = None) -> ExperimentConfig:
    """Compose, validate and return the typed experiment configuration."""
    return to_experiment_config(compose(overrides))


def to_experiment_config(cfg: DictConfig) -> ExperimentConfig:
    """The typed config of a composition (ours or `@hydra.main`'s), with its values checked.

    conf/config.yaml extends the `ExperimentConfig` schema, so Hydra has already checked keys
    and types; what is left is building the dataclasses and the value checks."""
    _check_known_keys(cfg)
    try:
        typed = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err, ())) from err
    if typed.privacy.accounting == "auto":  # the sampling that the secagg path can run
        typed.privacy.accounting = "without_replacement" if typed.secagg.name == "he" else "poisson"
    check_ranges(typed)  # first: the checks below build models and data from these numbers
    _check_values(typed)
    return typed


def resolved_yaml(cfg: ExperimentConfig) -> str:
    """The resolved configuration as YAML (written to `config.yaml` of each run)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _explain(err: Exception, overrides: tuple[str, ...]) -> str:
    msg = str(err).strip()
    if err.__cause__ is not None and str(err.__cause__) not in msg:
        msg = f"{msg}: {str(err.__cause__).strip()}"  # Hydra keeps the detail in the cause
    if msg.startswith("Could not override"):
        # Hydra suggests `+key=value`, which our schemas would reject anyway: say what is true.
        key = msg.split("'")[1]
        msg = f"'{key}' is not a key of the experiment configuration."
    # Drop Hydra's search-path dump: it names folders, not what the user can change.
    msg = msg.split("Config search path:")[0].strip()
    options = "; ".join(f"{g}={'|'.join(_group_options(g))}" for g in _groups())
    given = f" (overrides: {' '.join(overrides)})" if overrides else ""
    return (
        f"Invalid experiment configuration{given}: {msg}\n"
        f"Config groups and their options: {options}. Keys and defaults: conf/config.yaml "
        "and conf/<group>/<option>.yaml."
    )


def _groups() -> list[str]:
    return sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _check_privacy(cfg: ExperimentConfig, require) -> None:
    p = cfg.privacy
    if p.name == "none":
        return
    require(p.noise_multiplier >= 0, "privacy.noise_multiplier", "must be >= 0 (0: no noise)")
    require(p.clipping_norm > 0, "privacy.clipping_norm", "must be > 0")
    require(0 < p.target_delta < 1, "privacy.target_delta", "must be in (0, 1), e.g. 1e-5")
    require(
        p.epsilon_budget is None or p.epsilon_budget > 0,
        "privacy.epsilon_budget",
        "must be > 0, or null for no budget",
    )
    require(
        p.epsilon_budget is None or p.noise_multiplier > 0,
        "privacy.noise_multiplier",
        "noise_multiplier=0 releases updates without noise (epsilon = inf), so no round fits "
        "an epsilon_budget: set noise_multiplier > 0 or drop the budget",
    )
    require(
        p.noise_seed is None or p.allow_reproducible_noise,
        "privacy.noise_seed",
        "a noise seed in the config makes every noise draw reproducible by whoever reads the "
        "config, which voids the privacy guarantee: leave it null (OS CSPRNG), or force it for "
        "a test or benchmark with privacy.allow_reproducible_noise=true",
    )
    require(
        p.noise_seed is None or p.noise_seed >= 0,
        "privacy.noise_seed",
        "must be >= 0 (or null)",
    )
    if p.name in ("server_fixed", "client_fixed", "adaptive"):
        require(
            not (cfg.secagg.name == "he" and p.accounting == "poisson"),
            "privacy.accounting",
            "secagg=he samples a fixed-size cohort (an empty Poisson cohort would need a "
            "ciphertext no client sent): use privacy.accounting=without_replacement or auto",
        )
    if p.name in ("server_fixed", "client_fixed", "adaptive", "local"):
        n = cfg.simulation.num_supernodes
        require(
            p.target_delta < 1 / n,
            "privacy.target_delta",
            f"client-level DP needs delta < 1/N = 1/{n} clients (simulation.num_supernodes); "
            "delta >= 1/N allows releasing one client's data outright",
        )
    if p.name == "adaptive":
        require(0 <= p.target_quantile <= 1, "privacy.target_quantile", "must be in [0, 1]")
        require(p.clip_norm_lr > 0, "privacy.clip_norm_lr", "must be > 0")
        sampled = max(
            cfg.strategy.min_train_clients,
            int(cfg.strategy.fraction_train * cfg.simulation.num_supernodes),
        )
        count_std = p.clipped_count_stddev if p.clipped_count_stddev is not None else sampled / 20
        require(
            p.noise_multiplier < 2 * count_std,
            "privacy.noise_multiplier",
            f"adaptive clipping needs noise_multiplier < 2 * clipped_count_stddev = "
            f"{2 * count_std:g} (default stddev: {sampled} sampled clients / 20); raise "
            "privacy.clipped_count_stddev or sample more clients",
        )
    if p.name in ("local", "dpsgd"):
        require(
            p.epsilon_budget is None,
            "privacy.epsilon_budget",
            f"privacy={p.name} is accounted by each client, so the server cannot stop on a "
            "budget: leave it null"
            + (" and set privacy.target_epsilon (per client)" if p.name == "dpsgd" else ""),
        )
    if p.name == "dpsgd":
        require(p.max_grad_norm > 0, "privacy.max_grad_norm", "must be > 0")
        require(
            0 < p.sample_rate <= 1,
            "privacy.sample_rate",
            "must be in (0, 1]: the probability that an example joins a DP-SGD step",
        )
        require(
            p.target_epsilon is None or p.target_epsilon > 0,
            "privacy.target_epsilon",
            "must be > 0, or null to use privacy.noise_multiplier",
        )
        require(
            p.target_epsilon is not None or p.noise_multiplier > 0,
            "privacy.noise_multiplier",
            "DP-SGD needs noise: noise_multiplier > 0 or a target_epsilon",
        )
        require(
            cfg.strategy.name != "fedprox",
            "strategy.name",
            "FedProx's proximal term has no per-sample gradient, so DP-SGD would silently "
            "drop it: use strategy=fedavg|fedavgm|fedadam with privacy=dpsgd",
        )


def _check_training(cfg: ExperimentConfig, require) -> None:
    """DDP and AMP combinations that cannot work, caught before anything starts."""
    t = cfg.training
    require(t.world_size >= 1, "training.world_size", "must be at least 1 (1: no DDP)")
    require(t.ddp_timeout_s > 0, "training.ddp_timeout_s", "must be > 0 seconds")
    require(
        t.batch_size % t.world_size == 0,
        "training.batch_size",
        f"the client's batch is split evenly across training.world_size={t.world_size} "
        f"processes: use a multiple of {t.world_size}",
    )
    require(
        not (t.ddp_backend == "nccl" and t.device == "cpu"),
        "training.ddp_backend",
        "NCCL needs CUDA devices: use ddp_backend=gloo (or auto) with training.device=cpu",
    )
    require(
        not (t.precision == "fp16" and t.device == "cpu"),
        "training.precision",
        "float16 autocast needs CUDA (CPU kernels and GradScaler are for GPUs): use "
        "training.precision=bf16 on CPU",
    )
    if cfg.privacy.name == "dpsgd":
        require(
            t.precision == "fp32",
            "training.precision",
            "Opacus computes per-sample gradients in float32 and does not support autocast: "
            "use training.precision=fp32 with privacy=dpsgd",
        )
        require(
            t.world_size == 1,
            "training.world_size",
            "DP-SGD inside a DDP client is not supported (Opacus' DPDDP would need its "
            "distributed Poisson sampler and accountant wired per worker): use "
            "training.world_size=1 with privacy=dpsgd",
        )


def client_resources(cfg: ExperimentConfig) -> tuple[int, float]:
    """Ray resources per simulated client: (CPUs, GPUs). Explicit `simulation.client_*`
    values win; null follows the training config, so a DDP client reserves one CPU (and, on
    CUDA, one GPU) per worker process and Ray does not put more clients on a machine than it
    can run."""
    t, s = cfg.training, cfg.simulation
    cpus = s.client_cpus if s.client_cpus is not None else t.world_size * max(1, t.torch_threads)
    gpus = s.client_gpus if s.client_gpus is not None else (
        float(t.world_size) if t.device == "cuda" else 0.0
    )
    return cpus, gpus


def he_params(cfg: ExperimentConfig):
    """The `secagg` group as the HE parameters every party shares."""
    from protections.he.context import HEParams

    s = cfg.secagg
    return HEParams(
        poly_modulus_degree=s.poly_modulus_degree,
        coeff_mod_bit_sizes=tuple(s.coeff_mod_bit_sizes),
        plain_modulus_bits=s.plain_modulus_bits,
        scale_bits=s.scale_bits,
        max_abs_value=s.max_abs_value,
    )


def _check_secagg(cfg: ExperimentConfig, require) -> None:
    if cfg.secagg.name != "he":
        return
    require(
        cfg.strategy.name in ("fedavg", "fedprox"),
        "strategy.name",
        "under secagg=he the server only adds ciphertexts, so server optimizers "
        "(fedavgm, fedadam) that need the plaintext aggregate cannot run: use "
        "strategy=fedavg or strategy=fedprox",
    )
    require(
        cfg.privacy.name in ("none", "client_fixed", "local", "dpsgd"),
        "privacy.name",
        "under secagg=he the server cannot see updates, so it cannot clip them: use "
        "privacy=client_fixed (clients clip, the server adds noise to the encrypted sum), "
        "privacy=local or privacy=dpsgd",
    )
    require(cfg.secagg.scale_bits >= 1, "secagg.scale_bits", "must be >= 1")
    require(cfg.secagg.max_abs_value > 0, "secagg.max_abs_value", "must be > 0")
    require(cfg.secagg.max_weight >= 1, "secagg.max_weight", "must be >= 1")
    from protections.he.context import HEError

    params = he_params(cfg)
    try:
        params.seal_parameters()
        params.check_range()
    except HEError as err:
        raise ConfigError(f"Invalid experiment configuration: {err}") from err
    t = 2 ** (params.plain_modulus_bits - 1)  # t > 2^(bits-1): a lower bound on what fits
    most = params.max_total_weight(2 * t)
    require(
        cfg.secagg.max_weight <= most,
        "secagg.max_weight",
        f"{cfg.secagg.max_weight} exceeds {most}, the total weight the plaintext modulus holds "
        "at these settings: lower it or raise secagg.plain_modulus_bits",
    )
    if cfg.privacy.name == "client_fixed" and cfg.dataset.source != "hub":
        from core.data import data_spec
        from core.models import build_model, num_parameters

        d = num_parameters(build_model(cfg.model, data_spec(cfg.dataset)))
        slack = 0.5 * math.sqrt(d) / params.scale
        require(
            slack < 0.5 * cfg.privacy.clipping_norm,
            "secagg.scale_bits",
            f"the fixed-point rounding of {d} encrypted values can add up to {slack:.4g} "
            f"to an update's norm, too much for privacy.clipping_norm="
            f"{cfg.privacy.clipping_norm}: raise secagg.scale_bits",
        )


def _check_finetune(cfg: ExperimentConfig, require) -> None:
    """Public split, checkpoint, trainable selection (model loaded here: a mismatch fails
    before any training), compression and workload combinations."""
    m, d = cfg.model, cfg.dataset
    require(0.0 <= d.public_fraction < 1.0, "dataset.public_fraction", "must be in [0, 1)")
    require(
        d.public_fraction == 0 or d.source != "hub",
        "dataset.public_fraction",
        "a public split is carved from local data sets only (digits, breast_cancer, linear)",
    )
    require(m.lora.r >= 0, "model.lora.r", "must be >= 1 for LoRA adapters, or 0 for none")
    if m.lora.r > 0:
        require(m.lora.alpha > 0, "model.lora.alpha", "must be > 0")
        require(
            importlib.util.find_spec("peft") is not None,
            "model.lora.r",
            "LoRA adapters need peft: pip install -e '.[lora]'",
        )
    if m.pretrained is not None:
        require(
            Path(m.pretrained).expanduser().is_absolute(),
            "model.pretrained",
            "must be an absolute path: the ServerApp and ClientApps run from Flower's app "
            "folder, not from your checkout",
        )
    if d.source != "hub":
        from core.data import data_spec
        from core.finetune import FineTuneError, build_finetune_model

        try:
            build_finetune_model(m, data_spec(d))
        except FineTuneError as err:
            raise ConfigError(f"Invalid experiment configuration: {err}") from err
    c = cfg.compression
    if c.name != "none":
        require(
            cfg.secagg.name == "none",
            "compression.name",
            "compression applies to the plaintext path; under secagg=he clients already send "
            "fixed-point ciphertexts: use compression=none with secagg=he",
        )
        require(
            cfg.privacy.name != "client_fixed",
            "compression.name",
            "with privacy=client_fixed the server rejects updates above the clipping norm, and "
            "quantization error can push a clipped update over it: use privacy=server_fixed or "
            "privacy=adaptive (the server clips after dequantizing)",
        )
    w = cfg.workload
    if w.name == "capability":
        require(
            bool(w.capabilities) and all(0.0 < x <= 1.0 for x in w.capabilities),
            "workload.capabilities",
            "each capability must be in (0, 1] (1: full local work)",
        )
        require(
            cfg.privacy.name != "dpsgd",
            "workload.name",
            "DP-SGD's accounting assumes the configured local epochs on every client: use "
            "workload=uniform with privacy=dpsgd",
        )


def _check_values(cfg: ExperimentConfig) -> None:
    def value(key: str):
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    for key, choices in CHOICES.items():
        if value(key) not in choices:
            raise ConfigError(
                f"Invalid experiment configuration: {key}={value(key)!r} is not one of "
                f"{', '.join(choices)}."
            )

    def require(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"Invalid experiment configuration: {key}={value(key)!r}: {why}")

    require(cfg.num_rounds >= 1, "num_rounds", "run at least one round")
    require(0.0 < cfg.dataset.test_fraction < 1.0, "dataset.test_fraction", "must be in (0, 1)")
    require(0.0 <= cfg.dataset.val_fraction < 1.0, "dataset.val_fraction", "must be in [0, 1)")
    require(0.0 < cfg.strategy.fraction_train <= 1.0, "strategy.fraction_train", "must be in (0, 1]")
    require(
        0.0 <= cfg.strategy.fraction_evaluate <= 1.0,
        "strategy.fraction_evaluate",
        "must be in [0, 1] (0 turns federated evaluation off)",
    )
    for key in ("min_train_clients", "min_evaluate_clients", "min_available_clients"):
        require(value(f"strategy.{key}") >= 1, f"strategy.{key}", "must be at least 1")
    require(cfg.strategy.proximal_mu >= 0.0, "strategy.proximal_mu", "must be >= 0")
    require(
        cfg.strategy.name != "fedprox" or cfg.strategy.proximal_mu > 0.0,
        "strategy.proximal_mu",
        "FedProx needs proximal_mu > 0 (0 is plain FedAvg: use strategy=fedavg)",
    )
    require(cfg.training.local_epochs >= 1, "training.local_epochs", "must be at least 1")
    require(cfg.training.batch_size >= 1, "training.batch_size", "must be at least 1")
    require(cfg.training.lr > 0.0, "training.lr", "must be > 0")
    require(cfg.training.torch_threads >= 0, "training.torch_threads", "must be >= 0")
    _check_training(cfg, require)
    require(cfg.partitioner.alpha > 0.0, "partitioner.alpha", "Dirichlet alpha must be > 0")
    require(
        cfg.partitioner.classes_per_partition >= 1,
        "partitioner.classes_per_partition",
        "must be at least 1",
    )
    require(
        cfg.dataset.task == "classification" or cfg.partitioner.name == "iid",
        "partitioner.name",
        "label-skew partitioners need class labels; a regression data set "
        f"({cfg.dataset.name}) takes partitioner=iid",
    )
    require(
        cfg.model.name != "cnn" or cfg.dataset.name == "digits",
        "model.name",
        "the cnn reads 1x8x8 images: use dataset=digits, or model=mlp|linear",
    )
    require(
        cfg.dataset.source != "hub" or bool(cfg.dataset.hub_name),
        "dataset.hub_name",
        "a hub data set needs dataset.hub_name (e.g. ylecun/mnist)",
    )
    require(cfg.simulation.num_supernodes >= 1, "simulation.num_supernodes", "must be >= 1")
    _check_privacy(cfg, require)
    _check_secagg(cfg, require)
    _check_finetune(cfg, require)
    require(
        cfg.simulation.client_cpus is None or cfg.simulation.client_cpus >= 1,
        "simulation.client_cpus",
        "Flower needs whole CPUs (null: world_size x torch_threads)",
    )
    require(
        cfg.simulation.client_gpus is None or cfg.simulation.client_gpus >= 0,
        "simulation.client_gpus",
        "must be >= 0 (null: one per DDP process with training.device=cuda)",
    )
    if cfg.output_dir is not None:
        require(
            Path(cfg.output_dir).expanduser().is_absolute(),
            "output_dir",
            "must be an absolute path: the ServerApp runs from Flower's app folder, "
            "not from your checkout (e.g. output_dir=$PWD/outputs/run1)",
        )
    require(
        not cfg.resume or cfg.output_dir is not None,
        "resume",
        "resume=true continues the run in output_dir: set output_dir to that run's folder",
    )


# --------------------------------------------------------------------------- ranges
# Float keys where an infinite value means something (no timeout).
_INF_ALLOWED = frozenset({"training.ddp_timeout_s"})


def _check_known_keys(cfg: DictConfig) -> None:
    """Refuse keys that no schema declares (`+training.lrr=1`), listing the valid names."""
    import dataclasses

    def walk(node, schema, prefix: str) -> None:
        if not isinstance(node, DictConfig) or not dataclasses.is_dataclass(schema):
            return
        fields = {f.name: f for f in dataclasses.fields(schema)}
        for key in node.keys():
            name = f"{prefix}{key}"
            if key not in fields:
                valid = ", ".join(sorted(fields))
                where = f"'{prefix[:-1]}'" if prefix else "the top level"
                raise ConfigError(
                    f"Invalid experiment configuration: '{name}' is not a key of the "
                    f"experiment configuration (a '+' override adds a key no part of the run "
                    f"reads). Valid keys at {where}: {valid}."
                )
            ftype = fields[key].type
            sub = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
            if sub is not None and dataclasses.is_dataclass(sub):
                walk(node._get_node(key), sub, f"{name}.")
            elif isinstance(ftype, type) and dataclasses.is_dataclass(ftype):
                walk(node._get_node(key), ftype, f"{name}.")

    walk(cfg, ExperimentConfig, "")


def _float_leaves(obj, prefix: str = ""):
    import dataclasses

    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _float_leaves(value, f"{key}.")
        elif isinstance(value, float):
            yield key, value
        elif isinstance(value, list):
            yield from ((f"{key}[{i}]", v) for i, v in enumerate(value) if isinstance(v, float))


def check_ranges(cfg: ExperimentConfig) -> None:
    """Numbers with the right type that would train garbage or fail late (in a client, in
    Ray, after minutes): each refused before anything starts, naming the key and the fix."""

    def require(ok: bool, key: str, value, why: str) -> None:
        if not ok:
            raise ConfigError(f"Invalid experiment configuration: {key}={value!r}: {why}")

    for key, value in _float_leaves(cfg):
        require(
            math.isfinite(value) or (key in _INF_ALLOWED and value == math.inf),
            key,
            value,
            "must be a finite number (nan and inf train nothing meaningful)",
        )
    t, s, m, d = cfg.training, cfg.strategy, cfg.model, cfg.dataset
    require(t.lr > 0, "training.lr", t.lr, "the learning rate must be > 0, e.g. 0.05")
    require(
        0.0 <= t.momentum < 1.0,
        "training.momentum",
        t.momentum,
        "SGD momentum must be in [0, 1) (0: none, 0.9 is common)",
    )
    require(t.weight_decay >= 0.0, "training.weight_decay", t.weight_decay, "must be >= 0 (0: none)")
    require(cfg.seed >= 0, "seed", cfg.seed, "seeds must be >= 0 (numpy refuses negative seeds)")
    for i, size in enumerate(m.hidden_sizes):
        require(size >= 1, f"model.hidden_sizes[{i}]", size, "every layer needs at least 1 unit")
    for i, size in enumerate(m.channels):
        require(size >= 1, f"model.channels[{i}]", size, "every conv layer needs at least 1 channel")
    require(d.noise_std >= 0.0, "dataset.noise_std", d.noise_std, "a standard deviation is >= 0")
    require(d.n_samples >= 2, "dataset.n_samples", d.n_samples, "generate at least 2 samples")
    require(d.max_samples >= 0, "dataset.max_samples", d.max_samples, "must be >= 0 (0: all)")
    require(
        cfg.partitioner.min_partition_size >= 0,
        "partitioner.min_partition_size",
        cfg.partitioner.min_partition_size,
        "must be >= 0",
    )
    if cfg.partitioner.name == "pathological" and d.source != "hub":
        from core.data import data_spec

        classes = data_spec(d).num_outputs
        require(
            cfg.partitioner.classes_per_partition <= classes,
            "partitioner.classes_per_partition",
            cfg.partitioner.classes_per_partition,
            f"dataset={d.name} has only {classes} classes: use 1..{classes}",
        )
    if s.name == "fedadam":
        for key in ("beta_1", "beta_2"):
            beta = getattr(s, key)
            require(0.0 <= beta < 1.0, f"strategy.{key}", beta, "Adam's decay rates lie in [0, 1)")
        require(s.eta > 0, "strategy.eta", s.eta, "the server learning rate must be > 0")
        require(s.tau > 0, "strategy.tau", s.tau, "Adam's epsilon must be > 0, e.g. 1e-9")
    if s.name == "fedavgm":
        require(
            0.0 <= s.server_momentum < 1.0,
            "strategy.server_momentum",
            s.server_momentum,
            "server momentum must be in [0, 1)",
        )
        require(
            s.server_learning_rate > 0,
            "strategy.server_learning_rate",
            s.server_learning_rate,
            "must be > 0",
        )
    n = cfg.simulation.num_supernodes
    if d.source != "hub":
        from core.data import client_pool_size

        pool = client_pool_size(d, 0)  # the size does not depend on the seed
        require(
            n <= pool,
            "simulation.num_supernodes",
            n,
            f"dataset={d.name} has {pool} examples for the clients and every SuperNode needs "
            f"at least one: use at most {pool}",
        )
    needed = ["min_train_clients", "min_available_clients"]
    if s.fraction_evaluate > 0:
        needed.append("min_evaluate_clients")
    for key in needed:
        require(
            getattr(s, key) <= n,
            f"strategy.{key}",
            getattr(s, key),
            f"the federation has simulation.num_supernodes={n} SuperNodes, so this many "
            f"clients never come: lower it to <= {n} or raise simulation.num_supernodes",
        )
