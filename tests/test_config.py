import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.config import CONF_DIR, ConfigError, ExperimentConfig, load_config, resolved_yaml

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
    from app.config import parse_overrides
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
