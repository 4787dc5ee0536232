import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.config import CONF_DIR, ConfigError, ExperimentConfig, load_config, resolved_yaml

GROUP_OPTIONS = [
    (group.name, option.stem)
    for group in sorted(CONF_DIR.iterdir())
    if group.is_dir()
    for option in sorted(group.glob("*.yaml"))
]
COMPATIBLE = {"dataset=linear": "partitioner=iid model=linear", "model=cnn": "dataset=digits"}


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_every_group_option_composes(group, option):
    override = f"{group}={option}"
    cfg = load_config(f"{override} {COMPATIBLE.get(override, '')}")
    assert isinstance(cfg, ExperimentConfig)
    assert group == "training" or getattr(cfg, group).name == option


def test_defaults_are_the_documented_experiment():
    cfg = load_config("")
    assert (cfg.dataset.name, cfg.partitioner.name, cfg.model.name, cfg.strategy.name) == (
        "digits", "iid", "mlp", "fedavg",
    )  # fmt: skip
    assert cfg.num_rounds == 10 and cfg.simulation.num_supernodes == 10
    assert cfg.privacy.name == "none" and cfg.secagg.name == "none"


def test_overrides_reach_nested_keys_and_lists():
    cfg = load_config("model=mlp model.hidden_sizes=[32, 16] training.lr=0.01 seed=7")
    assert cfg.model.hidden_sizes == [32, 16]
    assert cfg.training.lr == 0.01 and cfg.seed == 7


def test_quoted_values_keep_their_spaces():
    from core.config import parse_overrides
    from app.sweep import hydra_quote

    path = "/tmp/my runs/it's [x]=y"
    overrides = ["num_rounds=2", f"output_dir={hydra_quote(path)}", "model.hidden_sizes=[8, 4]"]
    assert parse_overrides(" ".join(overrides)) == tuple(overrides)
    cfg = load_config(" ".join(overrides))
    assert cfg.output_dir == path and cfg.model.hidden_sizes == [8, 4]


def test_resolved_yaml_round_trips():
    cfg = load_config("strategy=fedprox num_rounds=3")
    text = resolved_yaml(cfg)
    assert "proximal_mu: 0.1" in text and "num_rounds: 3" in text


@pytest.mark.parametrize(
    "override,expected",
    [
        ("model=transformer", ["model/transformer", "cnn", "linear", "mlp"]),
        ("strategy=fedsgd", ["strategy/fedsgd", "fedadam", "fedavg", "fedavgm", "fedprox"]),
        ("foo=1", ["'foo' is not a key"]),
        ("training.momentun=0.5", ["'training.momentun' is not a key"]),
        ("num_rounds=abc", ["num_rounds", "abc"]),
        ("training.lr=fast", ["training.lr"]),
        ("training.optimizer=rmsprop", ["training.optimizer", "sgd, adam"]),
        ("num_rounds=0", ["num_rounds"]),
        ("strategy.fraction_train=1.5", ["strategy.fraction_train", "(0, 1]"]),
        ("dataset=linear partitioner=dirichlet", ["partitioner.name", "partitioner=iid"]),
        ("dataset=breast_cancer model=cnn", ["model.name", "dataset=digits"]),
        ("strategy=fedprox strategy.proximal_mu=0", ["proximal_mu", "strategy=fedavg"]),
        ("output_dir=relative/dir", ["output_dir", "absolute"]),
        ("simulation.client_cpus=0", ["simulation.client_cpus"]),
        ("'unbalanced", ["Cannot parse overrides", "quote"]),
        ("model.hidden_sizes=[1,", ["Cannot parse overrides", "brackets"]),
        ("privacy=dp", ["privacy/dp", "server_fixed", "dpsgd"]),
        ("privacy=server_fixed privacy.noise_multiplier=-1", ["privacy.noise_multiplier", ">= 0"]),
        ("privacy=client_fixed privacy.clipping_norm=0", ["privacy.clipping_norm", "> 0"]),
        ("privacy=server_fixed privacy.target_delta=0.2", ["privacy.target_delta", "1/N = 1/10"]),
        ("privacy=server_fixed privacy.accounting=exact", ["privacy.accounting", "poisson"]),
        ("privacy=adaptive privacy.noise_multiplier=1", ["clipped_count_stddev", "0.5"]),
        ("privacy=adaptive privacy.target_quantile=1.5", ["privacy.target_quantile"]),
        ("privacy=local privacy.epsilon_budget=3", ["privacy.epsilon_budget", "each client"]),
        ("privacy=dpsgd privacy.epsilon_budget=3", ["privacy.target_epsilon"]),
        ("privacy=dpsgd strategy=fedprox", ["strategy.name", "per-sample gradient"]),
        ("privacy=local privacy.noise_seed=1", ["privacy.noise_seed", "allow_reproducible_noise=true"]),
        ("privacy=dpsgd privacy.max_grad_norm=0", ["privacy.max_grad_norm"]),
        ("training.precision=fp8", ["training.precision", "fp32, bf16, fp16"]),
        ("training.device=cpu training.precision=fp16", ["training.precision=bf16"]),
        ("training.world_size=0", ["training.world_size", "at least 1"]),
        ("training.world_size=3", ["training.batch_size", "multiple of 3"]),
        ("training.device=cpu training.ddp_backend=nccl", ["ddp_backend=gloo"]),
        ("training.ddp_backend=mpi", ["training.ddp_backend", "auto, gloo, nccl"]),
        ("training.ddp_timeout_s=0", ["training.ddp_timeout_s"]),
        ("privacy=dpsgd training.precision=bf16", ["Opacus", "training.precision=fp32"]),
        ("privacy=dpsgd training=ddp training.precision=fp32", ["training.world_size=1"]),
        ("simulation.client_gpus=-1", ["simulation.client_gpus"]),
    ],
)
def test_bad_overrides_fail_with_the_key_and_the_fix(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(override)
    for fragment in expected:
        assert fragment in str(info.value)


@settings(max_examples=25, deadline=None)
@given(
    rounds=st.integers(1, 1000),
    lr=st.floats(1e-6, 10.0, allow_nan=False),
    frac=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_valid_numeric_overrides_are_taken_as_given(rounds, lr, frac, seed):
    cfg = load_config(
        f"num_rounds={rounds} training.lr={lr!r} strategy.fraction_train={frac!r} seed={seed}"
    )
    assert (cfg.num_rounds, cfg.training.lr, cfg.strategy.fraction_train, cfg.seed) == (
        rounds, lr, frac, seed,
    )  # fmt: skip


# Values with the right type that used to pass and train garbage or fail late (issue 17).
# Each fragment is text of the check's own message, never the override echoed back.
@pytest.mark.parametrize(
    "override,expected",
    [
        ("training.lr=inf", "must be a finite number"),
        ("training.lr=nan", "must be a finite number"),
        ("training.lr=-0.1", "the learning rate must be > 0"),
        ("training.momentum=-1", "SGD momentum must be in [0, 1)"),
        ("training.momentum=1", "SGD momentum must be in [0, 1)"),
        ("training.weight_decay=-1", "must be >= 0 (0: none)"),
        ("model.hidden_sizes=[0]", "every layer needs at least 1 unit"),
        ("model.hidden_sizes=[64,-4]", "every layer needs at least 1 unit"),
        ("model=cnn model.channels=[0,8]", "every conv layer needs at least 1 channel"),
        ("seed=-1", "numpy refuses negative seeds"),
        ("dataset=linear model=linear dataset.noise_std=-1", "a standard deviation is >= 0"),
        (
            "partitioner=pathological partitioner.classes_per_partition=11",
            "dataset=digits has only 10 classes: use 1..10",
        ),
        ("strategy=fedadam strategy.beta_1=2", "Adam's decay rates lie in [0, 1)"),
        ("strategy=fedadam strategy.beta_2=1.0", "Adam's decay rates lie in [0, 1)"),
        ("strategy=fedavgm strategy.server_momentum=1.5", "server momentum must be in [0, 1)"),
        ("strategy.min_train_clients=11", "simulation.num_supernodes=10 SuperNodes"),
        ("simulation.num_supernodes=3 strategy.min_available_clients=4", "lower it to <= 3"),
        ("strategy.min_evaluate_clients=12", "lower it to <= 10"),
    ],
)
def test_values_that_pass_types_but_cannot_train_are_refused(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(override)
    assert expected in str(info.value)


def test_min_evaluate_clients_is_not_checked_when_federated_evaluation_is_off():
    cfg = load_config("strategy.fraction_evaluate=0 strategy.min_evaluate_clients=12")
    assert cfg.strategy.min_evaluate_clients == 12


@pytest.mark.parametrize(
    "override,key,valid",
    [
        ("+training.lrr=1", "'training.lrr'", "Valid keys at 'training': batch_size,"),
        ("++training.lrr=1", "'training.lrr'", "local_epochs, lr, momentum,"),
        ("+model.lora.rank=4", "'model.lora.rank'", "Valid keys at 'model.lora': alpha, r, target."),
        ("+epochs=3", "'epochs'", "Valid keys at the top level: compression, dataset,"),
    ],
)
def test_keys_added_with_plus_are_refused_with_the_valid_names(override, key, valid):
    with pytest.raises(ConfigError) as info:
        load_config(override)
    message = str(info.value)
    assert f"{key} is not a key of the experiment configuration" in message
    assert valid in message


FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, -0.0, 1.0, 0.999, 1e-12, -1e-12]),
)


@settings(max_examples=60, deadline=None)
@given(lr=FLOATS, momentum=FLOATS, weight_decay=FLOATS)
def test_optimizer_values_are_accepted_exactly_when_they_can_train(lr, momentum, weight_decay):
    import math

    overrides = f"training.lr={lr!r} training.momentum={momentum!r} training.weight_decay={weight_decay!r}"
    valid = (
        math.isfinite(lr) and lr > 0
        and math.isfinite(momentum) and 0 <= momentum < 1
        and math.isfinite(weight_decay) and weight_decay >= 0
    )  # fmt: skip
    if valid:
        cfg = load_config(overrides)
        assert (cfg.training.lr, cfg.training.momentum, cfg.training.weight_decay) == (
            lr, momentum, weight_decay,
        )  # fmt: skip
    else:
        with pytest.raises(ConfigError) as info:
            load_config(overrides)
        # the key named is the first offender in the order the checks run: every float is
        # checked for finiteness first (dataclass order), then each key's range
        values = {"training.lr": lr, "training.momentum": momentum, "training.weight_decay": weight_decay}
        in_range = {
            "training.lr": lr > 0,
            "training.momentum": 0 <= momentum < 1,
            "training.weight_decay": weight_decay >= 0,
        }
        non_finite = [k for k, v in values.items() if not math.isfinite(v)]
        first = non_finite[0] if non_finite else next(k for k, ok in in_range.items() if not ok)
        assert f"Invalid experiment configuration: {first}=" in str(info.value)
