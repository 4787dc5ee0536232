"""The experiment's typed schema and the generic half of its validation (no protection here).

One dataclass per option of a config group, with that option's keys and defaults, and nothing
else: `privacy=server_fixed privacy.target_quantile=0.9` fails instead of being ignored,
because `target_quantile` is not a field of the server_fixed schema. The options of the groups
that belong to the task (dataset, partitioner, model, strategy, training, compression, workload)
are declared here in :data:`OPTIONS`; the privacy and secagg options with their protection
(protections/dp/config.py, protections/he/config.py), which subclass the group bases below.
app/config.py registers all of them in Hydra's ConfigStore and is where a configuration is
composed and checked (:func:`app.config.load_config`); this module only holds what that needs
and may not import: the schemas, the override parser, the foreign-key message and the checks
that read nothing but the config itself (core/config_checks.py has those that build the data
spec or the model).

Each default is written once, in these dataclasses: conf/config.yaml only picks one option per
group, and Hydra checks types while composing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import MISSING, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
CONFIG_NAME = "config"
SCHEMA_NAME = "experiment_schema"  # the first default of conf/config.yaml


class ConfigError(ValueError):
    """A bad experiment configuration: the message names the key and the fix."""


# --------------------------------------------------------------------------- schemas
# A group's options may set `misplaced`: for a key of another option that a user is likely to
# try on this one, why it does not apply here and what to use instead (shown with the error).
@dataclass
class DatasetConfig:
    """A data set; the options differ in where the data comes from (core/data.py)."""

    name: str = "digits"
    # sklearn: ships inside scikit-learn; synthetic: generated; hub: Flower Datasets / HF hub.
    # Fixed by the option (each source has its own schema).
    source: str = "sklearn"
    task: str = "classification"  # classification | regression
    test_fraction: float = 0.2  # held by the server for centralized evaluation
    val_fraction: float = 0.1  # each client's validation split


@dataclass
class LocalDatasetConfig(DatasetConfig):
    """A data set on this machine (digits, breast_cancer: scikit-learn's)."""

    # Share of the clients' pool held out as a public split that no client holds: what
    # `python -m app.pretrain` trains the pretrained checkpoint on.
    public_fraction: float = 0.0


@dataclass
class SyntheticDatasetConfig(LocalDatasetConfig):
    """dataset=linear: y = slope * x + intercept + N(0, noise_std^2), x ~ U(-1, 1)."""

    name: str = "linear"
    source: str = "synthetic"
    task: str = "regression"
    n_samples: int = 1000
    slope: float = 2.0
    intercept: float = 1.0
    noise_std: float = 0.1


@dataclass
class HubDatasetConfig(DatasetConfig):
    """A Hugging Face hub data set through Flower Datasets (needs the network on first use,
    then the HF cache; fails with a clear error when the hub cannot be reached)."""

    name: str = "mnist"
    source: str = "hub"
    hub_name: str = "ylecun/mnist"
    feature_key: str = "image"
    label_key: str = "label"
    max_samples: int = 0  # 0: all
    misplaced: ClassVar[dict[str, str]] = {
        "public_fraction": "a public split is carved from local data sets only "
        "(digits, breast_cancer, linear)",
    }


@dataclass
class ImageFolderDatasetConfig(DatasetConfig):
    """dataset=imagefolder: your own images, one folder per class (core/images.py).

    `path`: the folder the simulated clients share, `<path>/<class>/<image>`, or with
    `by_site` one folder per site, `<path>/<site>/<class>/<image>` (one SuperNode per site,
    partition i the i-th site in sorted order). `classes`: the class folders' names in
    class-id order (declared, never learned from the folders). Every image is converted to
    `channels` (1 grayscale, 3 RGB) and resized to `image_size` [height, width]. `test_path`:
    the server's held-out folder of class folders; empty: no centralized evaluation.
    `test_fraction` does not apply (the test set is `test_path`)."""

    name: str = "imagefolder"
    source: str = "file"
    path: str = ""
    classes: list[str] = field(default_factory=list)
    image_size: list[int] = field(default_factory=lambda: [28, 28])
    channels: int = 1
    by_site: bool = False
    test_path: str = ""


@dataclass
class CategoricalColumn:
    """One categorical input column of dataset=tabular and its declared categories (the
    one-hot order)."""

    column: str = MISSING
    categories: list[str] = MISSING


@dataclass
class TabularDatasetConfig(DatasetConfig):
    """dataset=tabular: your own CSV or Parquet file, declared column by column (core/tabular.py).

    The model's input is the numeric `features` followed by the one-hot `categorical` columns.
    Categories are declared here, never learned from the data: the one-hot layout is part of
    the model every client and the server share, and a vocabulary learned from the rows would
    carry one site's raw values into it (a value outside the declared list is an error at the
    site that holds it, naming the column). Clients standardize with their own training
    split's statistics (`standardize=client`); nothing about a client's data goes to the
    server. `test_path`: the server's held-out file (same columns) for centralized
    evaluation; empty: no centralized evaluation. `test_fraction` does not apply (the test set
    is `test_path`). `site_column`: one SuperNode per site through Flower Datasets'
    NaturalIdPartitioner (partition i is the i-th site in sorted order), instead of the
    partitioner."""

    name: str = "tabular"
    source: str = "file"
    task: str = "binary"  # binary | multiclass | regression
    path: str = ""  # absolute path of the .csv or .parquet file the simulated clients share
    features: list[str] = field(default_factory=list)  # numeric columns
    # e.g. [{column:ward,categories:[icu,surgery,medicine]}] (a list: Hydra replaces it whole)
    categorical: list[CategoricalColumn] = field(default_factory=list)
    label: str = "label"
    # Label values as written in the file, in class-id order; empty: 0 and 1 (binary only).
    classes: list[str] = field(default_factory=list)
    missing: str = "error"  # error | drop (the row) | mean (each client's own training mean)
    standardize: str = "client"  # client (own mean/std of its training split) | none
    site_column: str = ""  # e.g. hospital_id; empty: partition with the partitioner
    test_path: str = ""
    choices: ClassVar[dict[str, tuple[str, ...]]] = {
        "dataset.task": ("binary", "multiclass", "regression"),
        "dataset.missing": ("error", "drop", "mean"),
        "dataset.standardize": ("client", "none"),
    }

    def vocabulary(self) -> dict[str, list[str]]:
        """Categorical column -> its categories, in the model's input order."""
        return {c.column: list(c.categories) for c in self.categorical}


@dataclass
class TextDatasetConfig(DatasetConfig):
    """dataset=text: your own text classification file, CSV or JSON Lines (core/text.py).

    Read with Hugging Face `datasets` (`load_dataset("csv"|"json", data_files=path)`), each
    row's `text_column` tokenized with `tokenizer` (null: `model.name_or_path`, filled in when
    the config is loaded) to `max_length` tokens, and its `label_column` matched against the
    declared `classes` (as text, in class-id order: never learned from the rows, for the reason
    dataset=tabular gives). The rows are the clients' pool, split by the partitioner; the
    server's test set is `test_path` (same columns) or, when empty, a stratified
    `test_fraction` of `path` (simulation, where every party reads the same file)."""

    name: str = "text"
    source: str = "file"
    path: str = ""  # absolute path of the .csv, .json or .jsonl file
    test_path: str = ""
    text_column: str = "text"
    label_column: str = "label"
    classes: list[str] = field(default_factory=list)  # e.g. [negative, positive]
    max_length: int = 64  # tokens per example (padded or truncated)
    tokenizer: str | None = None  # null: model.name_or_path


@dataclass
class PartitionerConfig:
    """partitioner=iid: shuffled, equal-size shards (flwr_datasets IidPartitioner)."""

    name: str = "iid"


@dataclass
class DirichletPartitionerConfig(PartitionerConfig):
    """Label skew: each class is spread over clients by Dirichlet(alpha) proportions
    (flwr_datasets DirichletPartitioner). Smaller alpha -> more label skew."""

    name: str = "dirichlet"
    alpha: float = 0.5
    min_partition_size: int = 10
    self_balancing: bool = False


@dataclass
class PathologicalPartitionerConfig(PartitionerConfig):
    """Each client sees only `classes_per_partition` classes (flwr_datasets
    PathologicalPartitioner)."""

    name: str = "pathological"
    classes_per_partition: int = 2


@dataclass
class LoraConfig:
    """LoRA adapters through peft (core/finetune.py; needs the `lora` extra)."""

    r: int = 0  # LoRA rank; 0: no adapters
    alpha: float = 8.0  # peft's lora_alpha: the adapter's output is scaled by alpha / r
    target: str = "all"  # all (every Linear layer) | Linear module names, comma separated


@dataclass
class ModelConfig:
    """model=linear: one Linear layer (logistic regression for classification, y = w x + b for
    regression). The keys every model has: fine-tuning (core/finetune.py) from a checkpoint of
    `python -m app.pretrain` (absolute path), and which tensors train and travel: all | head
    (the last Linear layer) | module names, comma separated (e.g. 'features.2,head.0'); the
    others stay frozen and are never sent."""

    name: str = "linear"
    pretrained: str | None = None
    trainable: str = "all"
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class MLPModelConfig(ModelConfig):
    """model=mlp: hidden Linear layers with ReLU."""

    name: str = "mlp"
    hidden_sizes: list[int] = field(default_factory=lambda: [64])


@dataclass
class CNNModelConfig(MLPModelConfig):
    """model=cnn: 3x3 conv layers on 1x8x8 digit images, then the hidden layers and a linear
    head (no BatchNorm: Opacus-ready)."""

    name: str = "cnn"
    channels: list[int] = field(default_factory=lambda: [16, 32])


@dataclass
class HFModelConfig(ModelConfig):
    """model=hf: a Hugging Face transformers model (core/hf_model.py), loaded with
    AutoModelForSequenceClassification (dataset=text) or AutoModelForImageClassification (image
    data sets) from `name_or_path`: an absolute local directory (what `save_pretrained` writes)
    or a hub id such as distilbert-base-uncased (needs the network on first use; offline, with
    HF_HUB_OFFLINE=1 or no network, only the Hugging Face cache is read). Its task head is new,
    sized for the data set's classes. `trainable=head` (the default here) trains the head, the
    model's modules outside its base model (BERT: `classifier`); `lora.target` takes peft
    module-name patterns (`query,value` adapts every module whose name ends in .query or
    .value; `all`: every Linear layer outside the head)."""

    name: str = "hf"
    name_or_path: str = ""
    trainable: str = "head"
    misplaced: ClassVar[dict[str, str]] = {
        "hidden_sizes": "model=hf takes its architecture from model.name_or_path's config.json",
        "channels": "model=hf takes its architecture from model.name_or_path's config.json",
    }


@dataclass
class CompressionConfig:
    """Compressed client updates on the plaintext path (protections/compression/wire.py):
    none (float32 tensors) | fp16 (the update in float16, stochastically rounded) | int8 (int8
    with one float32 scale per tensor, stochastically rounded)."""

    name: str = "none"


@dataclass
class WorkloadConfig:
    """Local work per client (protections/workload/wire.py). workload=uniform: every sampled
    client runs training.local_epochs over its data; workload=capability: a client with compute
    c in (0, 1] runs round(c * steps) steps, so slow nodes stop holding a round back. A SuperNode
    declares `compute` in its node config; in simulation node i gets
    capabilities[i % len(capabilities)] under both options (the simulated round times of
    protections/workload/server.py compare them)."""

    name: str = "uniform"
    capabilities: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25])


@dataclass
class StrategyConfig:
    """strategy=fedavg (flwr.server.strategy.FedAvg); the sampling keys every strategy has."""

    name: str = "fedavg"
    fraction_train: float = 0.5  # share of clients sampled for training each round
    fraction_evaluate: float = 0.5  # share sampled for federated evaluation
    min_train_clients: int = 2
    min_evaluate_clients: int = 2
    min_available_clients: int = 2
    # How long a wait for enough connected clients may last before the run fails with the
    # numbers (before round 1 and whenever a round samples). null: 600 s in deployment,
    # 10 s in simulation (where every node registers within seconds of the start).
    client_wait_timeout_s: float | None = None
    # Federated evaluation (clients on their validation splits) every k-th round and on the
    # last round (num_rounds); the rounds between skip it and record `federated_skipped`.
    # 1: every round. Centralized evaluation runs every round regardless.
    evaluate_every: int = 1
    # Federated evaluation inside the train message: round r's sampled clients evaluate the
    # model they receive (round r-1's global model) on their validation split before they
    # train, and the server records it as round r-1's `federated`; only the last round sends
    # evaluate messages. One message per node per round instead of two (a deployed round
    # pays one ClientApp process, not two); the evaluating cohort is then the train cohort.
    evaluate_with_train: bool = False


@dataclass
class FedAvgMConfig(StrategyConfig):
    """strategy=fedavgm (flwr.server.strategy.FedAvgM): server-side momentum."""

    name: str = "fedavgm"
    server_learning_rate: float = 1.0
    server_momentum: float = 0.9


@dataclass
class FedProxConfig(StrategyConfig):
    """strategy=fedprox (flwr.server.strategy.FedProx): clients add (mu/2)||w - w_global||^2
    to their loss."""

    name: str = "fedprox"
    proximal_mu: float = 0.1


@dataclass
class FedAdamConfig(StrategyConfig):
    """strategy=fedadam (flwr.server.strategy.FedAdam): Adam on the server over the averaged
    update."""

    name: str = "fedadam"
    eta: float = 0.01  # server learning rate
    eta_l: float = 0.05  # client learning rate (reported by Flower only)
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-9


@dataclass
class PrivacyGroupConfig:
    """privacy=none, and the base of the differential-privacy options, which live with their
    protection (protections/dp/config.py)."""

    name: str = "none"


@dataclass
class SecAggConfig:
    """secagg=none (the server sees each client's update), and the base of the secure
    aggregation options, which live with their protection (protections/he/config.py)."""

    name: str = "none"


@dataclass
class TrainingConfig:
    """Each sampled client's local training (training=default; training=ddp changes two
    values, see :data:`OPTIONS`)."""

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
    # app.sweep / run_experiment: stop a job's `flwr run` (and the run on the SuperLink) after
    # this many seconds and record it failed, "timed out after N s". null: no limit.
    job_timeout_s: float | None = None


TRACKING_ENV = "PRIVACY_FT_TRACKING"


@dataclass
class TrackingConfig:
    """Experiment tracking with MLflow (app/tracking.py): the ServerApp logs the run's
    parameters, each round's measurements, its status and its files to an MLflow run. A
    tracking failure never fails the run: it is logged once and written to results.json
    (`run.tracking.error`)."""

    # Default true; the environment variable PRIVACY_FT_TRACKING=false turns it off for every
    # run that does not set it (the test suite does: tracking costs a run seconds of CPU).
    enabled: bool = "${oc.env:" + TRACKING_ENV + ",true}"  # type: ignore[assignment]
    # An MLflow tracking URI: a server (http://host:5000) or a database
    # (sqlite:////abs/path/mlflow.db). null: $MLFLOW_TRACKING_URI when set, else
    # sqlite:///<runs root>/mlflow.db (~/flower-private-finetune/runs/mlflow.db).
    uri: str | None = None
    experiment: str = "flower-private-finetune"  # the MLflow experiment (created when missing)


@dataclass
class EvaluationConfig:
    """What evaluation reports (core/evaluation.py; README "Metrics")."""

    # A binary task's decision: class 1 when p(class 1) >= threshold (sensitivity,
    # specificity and F1 use it; accuracy stays the argmax one).
    threshold: float = 0.5
    calibration_bins: int = 15  # equal-width confidence bins of the expected calibration error
    # Each federated evaluation's clients' own metrics in results.json (`federated_sites`),
    # besides their mean. null: on without privacy, off under any privacy option: a site's
    # metrics are computed on its data after the model and are not covered by DP.
    per_site: bool | None = None

    def per_site_enabled(self, privacy: str) -> bool:
        return self.per_site if self.per_site is not None else privacy == "none"


@dataclass
class ExperimentConfig:
    """The whole experiment. The group fields are MISSING here: conf/config.yaml's defaults
    list picks one option of each (digits, iid, mlp, fedavg, no privacy, no secagg, default
    training, no compression, uniform workload), and the option's schema replaces the base type."""

    dataset: DatasetConfig = MISSING
    partitioner: PartitionerConfig = MISSING
    model: ModelConfig = MISSING
    strategy: StrategyConfig = MISSING
    privacy: PrivacyGroupConfig = MISSING
    secagg: SecAggConfig = MISSING
    training: TrainingConfig = MISSING
    compression: CompressionConfig = MISSING
    workload: WorkloadConfig = MISSING
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    num_rounds: int = 10
    seed: int = 0
    # Absolute path for this run's results. null: ~/flower-private-finetune/runs/<time>-run<id>.
    output_dir: str | None = None
    # Continue the run in output_dir from its last checkpoint (app/checkpoint.py); only
    # num_rounds may differ from the first run's configuration.
    resume: bool = False


# The options of the task's groups: group -> option -> schema (a dataclass, or an instance where
# options share their keys and differ only in values). Registered by app/config.py.
OPTIONS: dict[str, dict[str, Any]] = {
    "dataset": {
        "digits": LocalDatasetConfig(name="digits"),
        "breast_cancer": LocalDatasetConfig(name="breast_cancer"),
        "linear": SyntheticDatasetConfig,
        "mnist": HubDatasetConfig,
        "cifar10": HubDatasetConfig(name="cifar10", hub_name="uoft-cs/cifar10", feature_key="img"),
        "tabular": TabularDatasetConfig,
        "text": TextDatasetConfig,
        "imagefolder": ImageFolderDatasetConfig,
    },
    "partitioner": {
        "iid": PartitionerConfig,
        "dirichlet": DirichletPartitionerConfig,
        "pathological": PathologicalPartitionerConfig,
    },
    "model": {
        "linear": ModelConfig,
        "mlp": MLPModelConfig,
        "cnn": CNNModelConfig,
        "hf": HFModelConfig,
    },
    "strategy": {
        "fedavg": StrategyConfig,
        "fedavgm": FedAvgMConfig,
        "fedprox": FedProxConfig,
        "fedadam": FedAdamConfig,
    },
    "training": {
        "default": TrainingConfig,
        # each client trains its local step in 2 DDP processes (gloo on CPU, NCCL on CUDA) with
        # bfloat16 autocast; simulated clients then reserve 2 CPUs each (simulation.*)
        "ddp": TrainingConfig(world_size=2, precision="bf16"),
    },
    "compression": {name: CompressionConfig(name=name) for name in ("none", "fp16", "int8")},
    "workload": {name: WorkloadConfig(name=name) for name in ("uniform", "capability")},
}

# Keys with a fixed set of values that are not a group's option (those come from the registry).
CHOICES: dict[str, tuple[str, ...]] = {
    "dataset.task": ("classification", "regression"),
    "training.optimizer": ("sgd", "adam"),
    "training.device": ("auto", "cpu", "cuda"),
    "training.ddp_backend": ("auto", "gloo", "nccl"),
    "training.precision": ("fp32", "bf16", "fp16"),
}


def schema_type(node: Any) -> type:
    """The dataclass of an option's schema (registered as a class or as an instance)."""
    return node if isinstance(node, type) else type(node)


def schema_keys(schema: type) -> list[str]:
    return sorted(f.name for f in dataclasses.fields(schema))


def foreign_key_message(
    group: str, option: str, key: str, options: Mapping[str, Any]
) -> str | None:
    """The error for `group.key` under `group=option` when `key` is a key of another option
    of the group (None when no option has it: then it is simply not a key). Names the key,
    the chosen option and its keys, and the options the key belongs to."""
    chosen = schema_type(options[option])
    owners = [
        name for name, node in options.items() if key in schema_keys(schema_type(node))
    ]
    if not owners or key in schema_keys(chosen):
        return None
    hint = getattr(chosen, "misplaced", {}).get(key)
    return (
        f"Invalid experiment configuration: {group}.{key} does not apply to {group}={option} "
        f"(its keys: {', '.join(schema_keys(chosen))}); it belongs to "
        f"{', '.join(f'{group}={o}' for o in owners)}." + (f" {hint}." if hint else "")
    )


def value_of(cfg: ExperimentConfig, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


Require = Callable[[bool, str, str], None]


def requirer(cfg: ExperimentConfig) -> Require:
    """`require(ok, key, why)`: raise a ConfigError naming `key`, its value and `why`."""

    def require(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(
                f"Invalid experiment configuration: {key}={value_of(cfg, key)!r}: {why}"
            )

    return require


def resolved_yaml(cfg: ExperimentConfig) -> str:
    """The resolved configuration as YAML (written to `config.yaml` of each run)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


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


# --------------------------------------------------------------------------- checks
# Float keys where an infinite value means something (no timeout).
_INF_ALLOWED = frozenset({"training.ddp_timeout_s"})


def _float_leaves(obj, prefix: str = ""):
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
    Ray, after minutes): each refused before anything starts, naming the key and the fix.
    (core/config_checks.py adds the ranges that depend on the data set.)"""

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
    if isinstance(m, MLPModelConfig):  # mlp, cnn
        for i, size in enumerate(m.hidden_sizes):
            require(size >= 1, f"model.hidden_sizes[{i}]", size, "every layer needs at least 1 unit")
    if isinstance(m, CNNModelConfig):
        for i, size in enumerate(m.channels):
            require(size >= 1, f"model.channels[{i}]", size, "every conv layer needs at least 1 channel")
    if isinstance(d, SyntheticDatasetConfig):
        require(d.noise_std >= 0.0, "dataset.noise_std", d.noise_std, "a standard deviation is >= 0")
        require(d.n_samples >= 2, "dataset.n_samples", d.n_samples, "generate at least 2 samples")
    if isinstance(d, HubDatasetConfig):
        require(d.max_samples >= 0, "dataset.max_samples", d.max_samples, "must be >= 0 (0: all)")
    if isinstance(cfg.partitioner, DirichletPartitionerConfig):
        require(
            cfg.partitioner.min_partition_size >= 0,
            "partitioner.min_partition_size",
            cfg.partitioner.min_partition_size,
            "must be >= 0",
        )
    if isinstance(s, FedAdamConfig):
        for key in ("beta_1", "beta_2"):
            beta = getattr(s, key)
            require(0.0 <= beta < 1.0, f"strategy.{key}", beta, "Adam's decay rates lie in [0, 1)")
        require(s.eta > 0, "strategy.eta", s.eta, "the server learning rate must be > 0")
        require(s.tau > 0, "strategy.tau", s.tau, "Adam's epsilon must be > 0, e.g. 1e-9")
    if isinstance(s, FedAvgMConfig):
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


def _check_evaluate_with_train(cfg: ExperimentConfig, require: Require) -> None:
    """strategy.evaluate_with_train=true moves federated evaluation into the train messages:
    it needs a federated evaluation to move."""
    s, key = cfg.strategy, "strategy.evaluate_with_train"
    require(
        s.evaluate_every == 1,
        key,
        f"it evaluates every round within the train messages, so strategy.evaluate_every="
        f"{s.evaluate_every} has no evaluate message to save: use one of the two",
    )
    require(
        s.fraction_evaluate > 0 and cfg.dataset.val_fraction > 0,
        key,
        "the run has no federated evaluation to move into the train messages "
        f"(strategy.fraction_evaluate={s.fraction_evaluate:g}, dataset.val_fraction="
        f"{cfg.dataset.val_fraction:g}); leave it false, or give both a value above 0",
    )
    privacy = cfg.privacy
    require(
        privacy.name == "none" or bool(getattr(privacy, "unprotected_metrics", False)),
        key,
        f"under privacy={privacy.name} federated evaluation is off (no accountant covers its "
        "metrics); set privacy.unprotected_metrics=true to report them outside the guarantee, "
        "or leave evaluate_with_train false",
    )


def check_values(cfg: ExperimentConfig, require: Require) -> None:
    """Values of the task's groups that have the right type but cannot work, naming the key
    and what to use instead (the protections check theirs in protections/*/config.py)."""
    # A dataset option may declare its own choices (dataset=tabular: binary|multiclass|regression).
    for key, choices in {**CHOICES, **getattr(type(cfg.dataset), "choices", {})}.items():
        if value_of(cfg, key) not in choices:
            raise ConfigError(
                f"Invalid experiment configuration: {key}={value_of(cfg, key)!r} is not one of "
                f"{', '.join(choices)}."
            )
    s, d, p = cfg.strategy, cfg.dataset, cfg.partitioner
    require(cfg.num_rounds >= 1, "num_rounds", "run at least one round")
    require(0.0 < d.test_fraction < 1.0, "dataset.test_fraction", "must be in (0, 1)")
    require(0.0 <= d.val_fraction < 1.0, "dataset.val_fraction", "must be in [0, 1)")
    require(0.0 < s.fraction_train <= 1.0, "strategy.fraction_train", "must be in (0, 1]")
    require(
        0.0 <= s.fraction_evaluate <= 1.0,
        "strategy.fraction_evaluate",
        "must be in [0, 1] (0 turns federated evaluation off)",
    )
    for key in ("min_train_clients", "min_evaluate_clients", "min_available_clients"):
        require(value_of(cfg, f"strategy.{key}") >= 1, f"strategy.{key}", "must be at least 1")
    require(
        s.evaluate_every >= 1,
        "strategy.evaluate_every",
        "must be at least 1 (1: federated evaluation every round; k: every k-th round and the "
        "last; to turn federated evaluation off use strategy.fraction_evaluate=0)",
    )
    if s.evaluate_with_train:
        _check_evaluate_with_train(cfg, require)
    if isinstance(s, FedProxConfig):
        require(s.proximal_mu >= 0.0, "strategy.proximal_mu", "must be >= 0")
        require(
            s.proximal_mu > 0.0,
            "strategy.proximal_mu",
            "FedProx needs proximal_mu > 0 (0 is plain FedAvg: use strategy=fedavg)",
        )
    require(cfg.training.local_epochs >= 1, "training.local_epochs", "must be at least 1")
    require(cfg.training.batch_size >= 1, "training.batch_size", "must be at least 1")
    require(cfg.training.lr > 0.0, "training.lr", "must be > 0")
    require(cfg.training.torch_threads >= 0, "training.torch_threads", "must be >= 0")
    _check_training(cfg, require)
    if isinstance(p, DirichletPartitionerConfig):
        require(p.alpha > 0.0, "partitioner.alpha", "Dirichlet alpha must be > 0")
    if isinstance(p, PathologicalPartitionerConfig):
        require(p.classes_per_partition >= 1, "partitioner.classes_per_partition", "must be at least 1")
    require(
        d.task != "regression" or p.name == "iid",
        "partitioner.name",
        "label-skew partitioners need class labels; a regression data set "
        f"({d.name}) takes partitioner=iid",
    )
    require(
        cfg.model.name != "cnn" or d.name in ("digits", "imagefolder"),
        "model.name",
        "the cnn reads images: use dataset=digits or dataset=imagefolder, or model=mlp|linear",
    )
    if isinstance(d, HubDatasetConfig):
        require(bool(d.hub_name), "dataset.hub_name", "a hub data set needs dataset.hub_name (e.g. ylecun/mnist)")
    if isinstance(d, TabularDatasetConfig):
        _check_tabular(d, p, require)
    if isinstance(d, TextDatasetConfig):
        _check_text(d, require)
    _check_hf(cfg, require)
    if isinstance(d, ImageFolderDatasetConfig):
        _check_image_folder(d, require)
    if isinstance(d, LocalDatasetConfig):
        require(0.0 <= d.public_fraction < 1.0, "dataset.public_fraction", "must be in [0, 1)")
    require(cfg.simulation.num_supernodes >= 1, "simulation.num_supernodes", "must be >= 1")
    for key, value in (("strategy.client_wait_timeout_s", cfg.strategy.client_wait_timeout_s),
                       ("simulation.job_timeout_s", cfg.simulation.job_timeout_s)):  # fmt: skip
        require(value is None or value > 0, key, "must be > 0 seconds, or null for the default")
    c, w = cfg.compression, cfg.workload
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
    _check_tracking(cfg.tracking, require)
    e = cfg.evaluation
    require(0.0 < e.threshold < 1.0, "evaluation.threshold", "must be in (0, 1): a probability of class 1")
    require(e.calibration_bins >= 1, "evaluation.calibration_bins", "must be >= 1 (15 is common)")


def _check_tracking(t: TrackingConfig, require: Require) -> None:
    """tracking.uri names its scheme (MLflow reads a bare path as its deprecated file store)
    and a local database by an absolute path (the ServerApp runs from Flower's app folder)."""
    require(bool(t.experiment.strip()), "tracking.experiment", "must name an MLflow experiment")
    if t.uri is None:
        return
    scheme, _, rest = t.uri.partition(":")
    require(
        re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*:.+", t.uri) is not None
        or t.uri in ("databricks", "databricks-uc"),
        "tracking.uri",
        "must be an MLflow tracking URI with its scheme: http://host:5000, "
        "sqlite:////abs/path/mlflow.db, or null for the default store",
    )
    if scheme == "sqlite":
        require(
            rest.startswith("////") or rest == "///:memory:",
            "tracking.uri",
            "a SQLite store is named by its absolute path, sqlite:////abs/path/mlflow.db "
            "(four slashes): the ServerApp runs from Flower's app folder, not from your checkout",
        )


def _require_absolute_paths(d: DatasetConfig, example: str, require: Require) -> None:
    """A file data set's `path` and `test_path`: empty, or absolute (the ServerApp and
    ClientApps run from Flower's app folder, not from the user's checkout)."""
    for key in ("path", "test_path"):
        value = getattr(d, key)
        require(
            not value or Path(value).expanduser().is_absolute(),
            f"dataset.{key}",
            "must be an absolute path: the ServerApp and ClientApps run from Flower's app "
            f"folder, not from your checkout (e.g. dataset.{key}=$PWD/data/{example})",
        )


def _check_image_folder(d: ImageFolderDatasetConfig, require: Require) -> None:
    """dataset=imagefolder's declaration, checked from the config alone (core/images.py
    checks the folders themselves)."""
    _require_absolute_paths(d, "images", require)
    require(
        len(d.classes) >= 2 and len(set(d.classes)) == len(d.classes),
        "dataset.classes",
        "declare the class folders' names in class-id order, each once, e.g. "
        "dataset.classes=[benign,malignant]",
    )
    require(d.channels in (1, 3), "dataset.channels", "must be 1 (grayscale) or 3 (RGB)")
    require(
        len(d.image_size) == 2 and all(v >= 2 for v in d.image_size),
        "dataset.image_size",
        "must be [height, width], each at least 2, e.g. dataset.image_size=[28,28]",
    )


def _check_tabular(d: TabularDatasetConfig, p: PartitionerConfig, require: Require) -> None:
    """dataset=tabular's schema, checked from the config alone (the file is read later, by
    whoever holds it: core/tabular.py checks its columns and values)."""
    _require_absolute_paths(d, "site.csv", require)
    require(
        bool(d.features or d.categorical),
        "dataset.features",
        "declare the model's input columns: dataset.features=[age,bp] (numeric) and/or "
        "dataset.categorical=[{column:ward,categories:[icu,surgery]}]",
    )
    require(bool(d.label), "dataset.label", "name the label column, e.g. dataset.label=outcome")
    columns = [*d.features, *d.vocabulary()]
    require(
        len(set(columns)) == len(columns),
        "dataset.features",
        "a column is listed twice (in features and/or categorical): list each once",
    )
    for key, reused in (("label", d.label), ("site_column", d.site_column)):
        require(
            reused not in columns,
            f"dataset.{key}",
            f"{reused!r} is also an input column: remove it from dataset.features/categorical",
        )
    for column, categories in d.vocabulary().items():
        require(
            len(categories) >= 1 and len(set(categories)) == len(categories),
            "dataset.categorical",
            f"column {column!r} needs a list of distinct categories, e.g. "
            f"{{column:{column},categories:[a,b]}}",
        )
    if d.task == "multiclass":
        require(
            len(d.classes) >= 2,
            "dataset.classes",
            "dataset.task=multiclass needs its label values in class order, e.g. "
            "dataset.classes=[low,mid,high]",
        )
    if d.task == "binary":
        require(
            len(d.classes) in (0, 2),
            "dataset.classes",
            "dataset.task=binary has two label values: [negative, positive] (empty: 0 and 1)",
        )
    if d.task == "regression":
        require(not d.classes, "dataset.classes", "dataset.task=regression has no classes: use []")
    require(
        not d.site_column or p.name == "iid",
        "partitioner.name",
        f"dataset.site_column={d.site_column} partitions by site (one SuperNode per site): "
        "use partitioner=iid (the default) with it, or drop dataset.site_column",
    )


def resolve_text_tokenizer(cfg: ExperimentConfig) -> None:
    """dataset=text's `tokenizer: null` is the model's own (`model.name_or_path`), filled in
    once here so that the data code needs only the dataset config and every party's resolved
    config (and config.yaml) names the tokenizer that ran."""
    if isinstance(cfg.dataset, TextDatasetConfig) and cfg.dataset.tokenizer is None:
        if isinstance(cfg.model, HFModelConfig) and cfg.model.name_or_path:
            cfg.dataset.tokenizer = cfg.model.name_or_path


def _check_text(d: TextDatasetConfig, require: Require) -> None:
    """dataset=text's schema, from the config alone (the file is read by whoever holds it:
    core/text.py checks its columns and labels)."""
    _require_absolute_paths(d, "reviews.csv", require)
    for key in ("path", "test_path"):
        value = getattr(d, key)
        require(
            not value or Path(value).suffix in (".csv", ".json", ".jsonl"),
            f"dataset.{key}",
            "dataset=text reads .csv, .json or .jsonl (JSON Lines) files",
        )
    require(bool(d.path), "dataset.path", "name the text file: dataset.path=/abs/path/reviews.csv")
    require(
        len(d.classes) >= 2 and len(set(d.classes)) == len(d.classes),
        "dataset.classes",
        "declare the label values as written in the file, distinct and in class-id order, "
        "e.g. dataset.classes=[negative,positive]",
    )
    require(bool(d.text_column), "dataset.text_column", "name the text column, e.g. text")
    require(bool(d.label_column), "dataset.label_column", "name the label column, e.g. label")
    require(
        d.text_column != d.label_column,
        "dataset.label_column",
        "the label column must differ from dataset.text_column",
    )
    require(d.max_length >= 2, "dataset.max_length", "must be >= 2 tokens")
    require(
        bool(d.tokenizer),
        "dataset.tokenizer",
        "dataset=text tokenizes with model=hf's tokenizer: use model=hf "
        "model.name_or_path=<dir or hub id>, or set dataset.tokenizer",
    )


def _check_hf(cfg: ExperimentConfig, require: Require) -> None:
    """model=hf with a data set it can read: token ids (dataset=text) for a sequence
    classifier, images (digits, hub image sets) for an image classifier; and dataset=text only
    with model=hf (token ids are no features for linear, mlp or cnn)."""
    m, d = cfg.model, cfg.dataset
    if not isinstance(m, HFModelConfig):
        require(
            not isinstance(d, TextDatasetConfig),
            "model.name",
            "dataset=text gives token ids: use model=hf model.name_or_path=<dir or hub id>",
        )
        return
    require(
        importlib.util.find_spec("transformers") is not None,
        "model.name",
        "model=hf needs transformers (and peft for LoRA): pip install -e '.[hf]'",
    )
    require(
        bool(m.name_or_path.strip()),
        "model.name_or_path",
        "model=hf needs a model: an absolute local directory (save_pretrained's output) or a "
        "hub id such as distilbert-base-uncased",
    )
    require(
        m.pretrained is None,
        "model.pretrained",
        "model=hf starts from model.name_or_path's weights (model.pretrained is the "
        "checkpoint of `python -m app.pretrain` for linear, mlp and cnn): drop model.pretrained",
    )
    image = d.name == "digits" or isinstance(d, (HubDatasetConfig, ImageFolderDatasetConfig))
    require(
        isinstance(d, TextDatasetConfig) or image,
        "dataset.name",
        "model=hf classifies text (dataset=text) or images (dataset=digits, mnist, cifar10, "
        "imagefolder)",
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
