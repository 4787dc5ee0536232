import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dataclasses
import re

from omegaconf import OmegaConf

from app.config import OPTIONS, load_config, schema_for, to_experiment_config
from core.config import ConfigError, ExperimentConfig, resolved_yaml, schema_keys, schema_type

GROUP_OPTIONS = [(group, option) for group, options in OPTIONS.items() for option in options]
COMPATIBLE = {
    "dataset=linear": "partitioner=iid model=linear",
    "model=cnn": "dataset=digits",
    "dataset=tabular": "dataset.features=[x]",  # a file schema declares its input columns
    "dataset=imagefolder": "dataset.classes=[a,b]",  # as an image folder its classes
}
# model=hf and dataset=text need each other and files (a model directory, a text file), which
# tests/support/hf_text.py writes on first use
NEEDS_FILES = ("dataset=text", "model=hf")


def compatible(override: str) -> str:
    if override in NEEDS_FILES:
        from tests.support.hf_text import text_overrides

        return " ".join(t for t in text_overrides().split() if t != override)
    return COMPATIBLE.get(override, "")


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_every_group_option_composes(group, option):
    override = f"{group}={option}"
    cfg = load_config(f"{override} {compatible(override)}")
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
        ("num_rounds=abc", ["full_key: num_rounds", "'abc' of type 'str' could not be converted to Integer"]),
        ("training.lr=fast", ["full_key: training.lr", "could not be converted to Float"]),
        ("training.optimizer=rmsprop", ["training.optimizer", "sgd, adam"]),
        ("num_rounds=0", ["num_rounds=0: run at least one round"]),
        ("strategy.fraction_train=1.5", ["strategy.fraction_train", "(0, 1]"]),
        ("dataset=linear partitioner=dirichlet", ["partitioner.name", "partitioner=iid"]),
        ("dataset=breast_cancer model=cnn", ["model.name", "dataset=digits"]),
        ("strategy=fedprox strategy.proximal_mu=0", ["proximal_mu", "strategy=fedavg"]),
        ("output_dir=relative/dir", ["output_dir", "absolute"]),
        ("simulation.client_cpus=0", ["simulation.client_cpus=0: Flower needs whole CPUs"]),
        ("'unbalanced", ["Cannot parse overrides", "quote"]),
        ("model.hidden_sizes=[1,", ["Cannot parse overrides", "brackets"]),
        ("privacy=dp", ["privacy/dp", "server_fixed", "dpsgd"]),
        ("privacy=server_fixed privacy.noise_multiplier=-1", ["privacy.noise_multiplier", ">= 0"]),
        ("privacy=client_fixed privacy.clipping_norm=0", ["privacy.clipping_norm", "> 0"]),
        ("privacy=server_fixed privacy.target_delta=0.2", ["privacy.target_delta", "1/N = 1/10"]),
        ("privacy=server_fixed privacy.accounting=exact", ["privacy.accounting", "poisson"]),
        ("privacy=adaptive privacy.noise_multiplier=1", ["clipped_count_stddev", "0.5"]),
        ("privacy=adaptive privacy.target_quantile=1.5", ["privacy.target_quantile=1.5: must be in [0, 1]"]),
        ("privacy=local privacy.epsilon_budget=3", ["privacy.epsilon_budget", "each client"]),
        ("privacy=dpsgd privacy.epsilon_budget=3", ["privacy.target_epsilon"]),
        ("privacy=dpsgd strategy=fedprox", ["strategy.name", "per-sample gradient"]),
        ("privacy=local privacy.noise_seed=1", ["privacy.noise_seed", "allow_reproducible_noise=true"]),
        ("privacy=dpsgd privacy.max_grad_norm=0", ["privacy.max_grad_norm=0.0: must be > 0"]),
        ("training.precision=fp8", ["training.precision", "fp32, bf16, fp16"]),
        ("training.device=cpu training.precision=fp16", ["training.precision=bf16"]),
        ("training.world_size=0", ["training.world_size", "at least 1"]),
        ("training.world_size=3", ["training.batch_size", "multiple of 3"]),
        ("training.device=cpu training.ddp_backend=nccl", ["ddp_backend=gloo"]),
        ("training.ddp_backend=mpi", ["training.ddp_backend", "auto, gloo, nccl"]),
        ("training.ddp_timeout_s=0", ["training.ddp_timeout_s=0.0: must be > 0 seconds"]),
        ("privacy=dpsgd training.precision=bf16", ["Opacus", "training.precision=fp32"]),
        ("privacy=dpsgd training=ddp training.precision=fp32", ["training.world_size=1"]),
        ("simulation.client_gpus=-1", ["simulation.client_gpus=-1.0: must be >= 0"]),
    ],
)
def test_bad_overrides_fail_with_the_key_and_the_fix(override, expected):
    # a message that echoes the overrides would contain fragments taken from them: each case
    # asserts at least one fragment of the check's own text
    assert not all(fragment in override for fragment in expected)
    with pytest.raises(ConfigError) as info:
        load_config(override)
    for fragment in expected:
        assert fragment in str(info.value)


@settings(max_examples=15, deadline=None)
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


@settings(max_examples=30, deadline=None)
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


# --------------------------------------------------------------------------- per-option schemas
def override_text(value) -> str:
    """A value in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(override_text(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


def option_defaults(group: str, option: str) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(OPTIONS[group][option]))


def owners(group: str, key: str) -> list[str]:
    return [o for o, node in OPTIONS[group].items() if key in schema_keys(schema_type(node))]


# Every (group, option, key) where key is a key of another option of the group.
FOREIGN_KEYS = [
    (group, option, key)
    for group, options in OPTIONS.items()
    for option, node in options.items()
    for key in sorted({k for other in options.values() for k in schema_keys(schema_type(other))})
    if key not in schema_keys(schema_type(node))
]


def test_the_groups_whose_options_differ_in_keys_have_one_schema_per_option():
    differ = {group for group, _, _ in FOREIGN_KEYS}
    assert differ == {"dataset", "partitioner", "model", "strategy", "privacy", "secagg"}
    assert len({schema_type(n) for n in OPTIONS["privacy"].values()}) == 5  # server/client_fixed share
    assert len(FOREIGN_KEYS) >= 60


# Hydra refuses a plain override of a key the schema lacks; a '+' override adds it and the
# check after composing refuses it (the same message): that path for one option's keys.
CASES = [(g, o, k, "") for g, o, k in FOREIGN_KEYS] + [
    (g, o, k, "+") for g, o, k in FOREIGN_KEYS if (g, o) == ("privacy", "server_fixed")
]


@pytest.mark.parametrize("group,option,key,plus", CASES)
def test_a_key_of_another_option_is_refused_naming_the_option_that_has_it(group, option, key, plus):
    owner = owners(group, key)[0]
    value = override_text(option_defaults(group, owner)[key])
    with pytest.raises(ConfigError) as info:
        load_config(f"{group}={option} {plus}{group}.{key}={value}")
    message = str(info.value)
    own = ", ".join(sorted(option_defaults(group, option)))
    assert f"{group}.{key} does not apply to {group}={option} (its keys: {own}); it belongs to " in message
    assert ", ".join(f"{group}={o}" for o in owners(group, key)) + "." in message
    assert "(overrides:" not in message  # the check's own text, not Hydra's echo


@pytest.mark.parametrize(
    "override,hint",
    [
        ("privacy=server_fixed privacy.target_quantile=0.9", "it belongs to privacy=adaptive."),
        ("privacy=dpsgd privacy.clipping_norm=2", "DP-SGD clips each example's gradient: set privacy.max_grad_norm"),
        ("privacy=local privacy.accounting=poisson", "each client accounts its own releases"),
        ("secagg=none secagg.scale_bits=20", "it belongs to secagg=he."),
        ("strategy=fedavg strategy.proximal_mu=0.1", "it belongs to strategy=fedprox."),
        ("dataset=mnist dataset.public_fraction=0.2", "a public split is carved from local data sets only"),
        ("model=linear model.hidden_sizes=[8]", "it belongs to model=mlp, model=cnn."),
        ("partitioner=iid partitioner.alpha=0.1", "it belongs to partitioner=dirichlet."),
    ],
)
def test_keys_that_used_to_be_ignored_are_refused_with_the_fix(override, hint):
    with pytest.raises(ConfigError) as info:
        load_config(override)
    assert "does not apply to" in str(info.value) and hint in str(info.value)


def test_a_key_no_option_has_is_not_a_key_and_a_name_alone_does_not_switch_the_option():
    with pytest.raises(ConfigError, match=r"'privacy.target_quantil' is not a key"):
        load_config("privacy=adaptive privacy.target_quantil=0.9")
    with pytest.raises(ConfigError, match=r"privacy.name='adaptive' does not select an option: use privacy=adaptive"):
        load_config("privacy=server_fixed privacy.name=adaptive")
    with pytest.raises(ConfigError, match=r"strategy.name='fedsgd' is not one of fedavg, fedavgm, fedprox, fedadam"):
        load_config("strategy.name=fedsgd")
    with pytest.raises(ConfigError, match=r"dataset.source='hub': dataset=digits reads sklearn data"):
        load_config("dataset.source=hub")


def test_option_defaults_are_the_documented_ones():
    # the values conf/<group>/<option>.yaml used to set, now written once in the schemas
    assert load_config("privacy=adaptive").privacy.noise_multiplier == 0.4
    assert load_config("strategy=fedavgm").strategy.server_momentum == 0.9
    assert load_config("strategy=fedadam").strategy.eta_l == 0.05
    assert load_config("strategy=fedprox").strategy.proximal_mu == 0.1
    cifar = load_config("dataset=cifar10").dataset
    assert (cifar.hub_name, cifar.feature_key, cifar.source) == ("uoft-cs/cifar10", "img", "hub")
    ddp = load_config("training=ddp").training
    assert (ddp.world_size, ddp.precision, ddp.batch_size) == (2, "bf16", 16)
    from protections.he.context import HEParams
    from protections.he.config import he_params

    assert he_params(load_config("secagg=he")) == HEParams()


# Per group option: its own keys and a value drawn in the range that can train (each float
# default scaled by a factor in [0.5, 1]; bools and the accounting drawn; the rest at the
# default, nested groups such as model.lora left out).
SETTABLE = [(g, o) for g, o in GROUP_OPTIONS if len(option_defaults(g, o)) > 1]


@st.composite
def own_keys_with_values(draw):
    group, option = draw(st.sampled_from(SETTABLE))
    defaults = option_defaults(group, option)
    # keys COMPATIBLE sets for the option keep its value (dataset=tabular: its input columns)
    fixed = {t.split("=")[0] for t in compatible(f"{group}={option}").split()}
    own = sorted(k for k in defaults if k != "name" and f"{group}.{k}" not in fixed)
    keys = draw(st.lists(st.sampled_from(own), min_size=1, unique=True))
    values = {}
    for key in keys:
        default = defaults[key]
        if isinstance(default, bool):
            values[key] = draw(st.booleans())
        elif isinstance(default, float):
            values[key] = default * draw(st.floats(0.5, 1.0))
        elif key == "accounting":  # auto is resolved: draw what it resolves to
            values[key] = draw(st.sampled_from(["poisson", "without_replacement"]))
        elif not isinstance(default, dict):
            values[key] = default
    return group, option, values


@settings(max_examples=25, deadline=None)
@given(own_keys_with_values())
def test_keys_of_the_chosen_option_are_accepted_and_taken_as_given(case):
    group, option, values = case
    overrides = [f"{group}={option}", *compatible(f"{group}={option}").split()]
    overrides += [f"{group}.{k}={override_text(v)}" for k, v in values.items()]
    node = getattr(load_config(" ".join(overrides)), group)
    assert {key: getattr(node, key) for key in values} == values


def test_validated_configs_are_cached_and_handed_out_as_copies():
    first = load_config("privacy=adaptive")
    first.privacy.target_quantile = 0.9
    second = load_config("privacy=adaptive")
    assert second.privacy.target_quantile == 0.5 and second is not first
    assert dataclasses.asdict(second) == dataclasses.asdict(load_config("privacy=adaptive"))


@pytest.mark.parametrize(
    "overrides",
    ["privacy=client_fixed secagg=he", "privacy=dpsgd strategy=fedadam model=cnn", "dataset=linear model=linear"],
)
def test_a_saved_config_reads_back_into_the_option_schemas(overrides):
    cfg = load_config(overrides)
    saved = OmegaConf.create(resolved_yaml(cfg))
    assert to_experiment_config(OmegaConf.merge(schema_for(saved), saved)) == cfg


def test_the_he_key_tool_takes_secagg_keys_without_naming_the_option(tmp_path):
    from app.he_keys import main
    from protections.he.context import PUBLIC_FILE, load_context

    assert main(["provision", "--out", str(tmp_path), "secagg.scale_bits=12"]) == 0
    assert load_context(tmp_path / PUBLIC_FILE).params.scale_bits == 12
    assert main(["provision", "--out", str(tmp_path / "again"), "secagg=he"]) == 0
    assert load_context(tmp_path / "again" / PUBLIC_FILE).params.scale_bits == 16


@pytest.mark.parametrize("overrides", [
    "", "privacy=adaptive privacy.target_quantile=0.9", "training.lr=0.01 num_rounds=3 seed=5",
    "dataset=tabular dataset.features=[a,b] dataset.categorical=[{column:ward,categories:[icu,surgery]}]",
    "model.hidden_sizes=[64,32] output_dir='/runs/my run'", "secagg=he secagg.scale_bits=20 privacy=client_fixed",
    "privacy.noise_multiplier=0.5 privacy=server_fixed", "training=ddp training.world_size=2",
    "evaluation.threshold=0.3 strategy.evaluate_every=2 +training.extra=1",
])  # fmt: skip
def test_the_cached_composition_is_hydras(overrides):
    """app/config.py composes each choice of options once and applies the key=value overrides
    with Hydra's own function: the same config as Hydra's compose of the whole string."""
    from app.config import _compose_cached, _hydra_compose
    from core.config import parse_overrides

    tokens = parse_overrides(overrides)
    assert OmegaConf.to_container(_compose_cached(tokens)) == OmegaConf.to_container(_hydra_compose(tokens))


@pytest.mark.parametrize("override,hydra_says", [
    ("training.lrr=1", "Could not override 'training.lrr'"),
    ("num_rounds=abc", "Error merging override num_rounds=abc"),
])  # fmt: skip
def test_the_cached_composition_fails_as_hydra_does(override, hydra_says):
    from hydra.errors import HydraException

    from app.config import _compose_cached, _hydra_compose

    with pytest.raises(HydraException, match=re.escape(hydra_says)):
        _hydra_compose((override,))
    with pytest.raises(ConfigError) as err:
        _compose_cached((override,))
    assert isinstance(err.value.__cause__, HydraException) and hydra_says in str(err.value.__cause__)
