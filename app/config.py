"""Compose an experiment from `conf/` with Hydra, validate it, and hand out typed values.

Config is read once, at the edge: the ServerApp, the ClientApp and the sweep CLI all call
:func:`load_config` with the same override strings and get the same typed `ExperimentConfig`.
This is the one module that knows every group's options: the task's from core/config.py and
the protections' from protections/dp/config.py and protections/he/config.py, registered here in
Hydra's ConfigStore (one schema per option; conf/config.yaml only picks the defaults). It sits
above both, so core never imports a protection and the protections never import each other.

Validation happens in three layers, all before any training:
1. Hydra rejects an unknown group option (`model=foo`) and lists the available ones, and,
   since each option's schema holds only its own keys, a key of another option:
   `privacy=server_fixed privacy.target_quantile=0.9` names the key, the option, its keys
   and the option the key belongs to (adaptive). Keys a `+key=` override adds are refused the
   same way (:func:`_check_known_keys`): Hydra accepts them and the dataclass would drop them.
2. Merging into the dataclasses rejects wrong types (`num_rounds=abc`).
3. Values with the right type that cannot work: core.config.check_ranges and check_values (the
   task's groups), core/config_checks.py (those that need the data set or the model),
   protections/dp/config.py and protections/he/config.py (their options), each naming the key
   and what to use instead.

A validated configuration is cached per override string (and the checkpoint file it names,
the one file validation reads), so a ClientApp that calls :func:`load_config` for every message
pays composition and the model-building checks once per run.
"""

from __future__ import annotations

import copy
import dataclasses
from functools import lru_cache
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from core import config as core_config
from core.config import (
    CONF_DIR,
    CONFIG_NAME,
    SCHEMA_NAME,
    ConfigError,
    ExperimentConfig,
    check_ranges,
    check_values,
    foreign_key_message,
    parse_overrides,
    requirer,
    schema_type,
)
from core.config_checks import check_data_ranges, check_finetune
from protections.dp import config as dp_config
from protections.he import config as he_config

# group -> option -> schema, in the order the options are listed in messages.
OPTIONS: dict[str, dict[str, Any]] = {
    **core_config.OPTIONS,
    "privacy": dp_config.OPTIONS,
    "secagg": he_config.OPTIONS,
}


def _register() -> None:
    """`ExperimentConfig` is the base of conf/config.yaml (its first default); each group
    option is stored under its group, so `privacy=adaptive` selects `AdaptiveDPConfig`."""
    cs = ConfigStore.instance()
    cs.store(name=SCHEMA_NAME, node=ExperimentConfig)
    for group, options in OPTIONS.items():
        for name, node in options.items():
            cs.store(group=group, name=name, node=node)


_register()


# --------------------------------------------------------------------------- loading
def compose(overrides: str | list[str] | tuple[str, ...] | None = None) -> DictConfig:
    """Compose `conf/config.yaml` with Hydra overrides (no validation beyond Hydra's)."""
    return _compose_cached(parse_overrides(overrides))


@lru_cache(maxsize=32)
def _compose_cached(overrides: tuple[str, ...]) -> DictConfig:
    # Imported here: only needed when composing.
    from hydra.errors import HydraException

    try:
        split = _split_overrides(overrides)
        if split is None:  # anything but plain `group=option` and `key=value`: all Hydra's
            return _hydra_compose(overrides)
        groups, values = split
        # Hydra composes the defaults list from the `group=option` overrides, then applies the
        # `key=value` ones to the result (hydra/_internal/config_loader_impl.py
        # _load_configuration_impl, `_apply_overrides_to_config`). Here the first step is
        # cached per choice of options and the second is Hydra's own function on a copy: the
        # same config and the same errors, for ~10 ms instead of ~130 ms a call (a client, a
        # sweep job and the config tests compose once per distinct override string).
        cfg = copy.deepcopy(_hydra_compose(groups))
        from hydra._internal.config_loader_impl import ConfigLoaderImpl

        ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_explain(err, overrides)) from err
    return cfg


@lru_cache(maxsize=64)
def _hydra_compose(overrides: tuple[str, ...]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides))


def _split_overrides(overrides: tuple[str, ...]):
    """(the `group=option` overrides as given, the other overrides parsed) when every
    override is a plain change (no sweep, no +/++/~, no package), else None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    groups, values = [], []
    for text, override in zip(overrides, parsed):
        if override.type != OverrideType.CHANGE or override.is_sweep_override() or override.package:
            return None
        if override.key_or_group in OPTIONS:
            groups.append(text)
        else:
            values.append(override)
    return tuple(groups), values


def load_config(overrides: str | list[str] | tuple[str, ...] | None = None) -> ExperimentConfig:
    """Compose, validate and return the typed experiment configuration (a fresh copy: callers
    may change it without touching the cached one)."""
    tokens = parse_overrides(overrides)
    return copy.deepcopy(_validated(tokens, _checkpoint_stamp(_compose_cached(tokens))))


@lru_cache(maxsize=32)
def _validated(tokens: tuple[str, ...], checkpoint_stamp: tuple | None) -> ExperimentConfig:
    del checkpoint_stamp  # part of the cache key only: a rewritten checkpoint is checked again
    return to_experiment_config(_compose_cached(tokens))


def _checkpoint_stamp(cfg: DictConfig) -> tuple | None:
    """The version of the checkpoint `model.pretrained` names, which validation loads."""
    path = cfg.model.get("pretrained")
    if path is None:
        return None
    try:
        stat = Path(path).expanduser().stat()
    except OSError:
        return (path, None)
    return (path, stat.st_mtime_ns, stat.st_size)


def to_experiment_config(cfg: DictConfig) -> ExperimentConfig:
    """The typed config of a composition (ours or `@hydra.main`'s), with its values checked.

    conf/config.yaml extends the `ExperimentConfig` schema and each group option its own, so
    Hydra has already checked keys and types; what is left is building the dataclasses and the
    value checks."""
    _check_known_keys(cfg)
    try:
        typed = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err, ())) from err
    _check_options(typed)
    dp_config.resolve_accounting(typed)
    core_config.resolve_text_tokenizer(typed)
    check_ranges(typed)  # first: the checks below build models and data from these numbers
    check_data_ranges(typed)
    require = requirer(typed)
    check_values(typed, require)
    dp_config.check_privacy(typed, require)
    he_config.check_secagg(typed, require)
    check_finetune(typed, require)
    return typed


def with_option(
    overrides: str | list[str] | tuple[str, ...] | None, group: str, option: str
) -> tuple[str, ...]:
    """`overrides` with `group=option` first unless they select the group themselves: the HE
    key tools (app/he_keys.py, app/deploy.py) take `secagg.*` overrides, keys of secagg=he."""
    tokens = parse_overrides(overrides)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(tokens))
    if any(o.key_or_group == group for o in parsed):
        return tokens
    return (f"{group}={option}", *tokens)


def schema_for(saved: DictConfig) -> DictConfig:
    """The structured schema a run's saved `config.yaml` merges into: each group typed by the
    option the file names (app/he_keys.py reads a finished run's configuration with it)."""
    schema = OmegaConf.structured(ExperimentConfig)
    for group, options in OPTIONS.items():
        name = OmegaConf.select(saved, f"{group}.name", default=None)
        node = options.get(name, next(iter(options.values())))  # training: one schema
        schema[group] = OmegaConf.structured(node)
    return schema


def _check_options(cfg: ExperimentConfig) -> None:
    """`<group>.name` is set by the option: changing it alone would keep the first option's
    schema (and its defaults) under another name."""
    for group, options in OPTIONS.items():
        node = getattr(cfg, group)
        name = getattr(node, "name", None)
        if name is None:  # training: its options differ in values, not in keys
            continue
        if name not in options:
            raise ConfigError(
                f"Invalid experiment configuration: {group}.name={name!r} is not one of "
                f"{', '.join(options)}."
            )
        if type(node) is not schema_type(options[name]):
            raise ConfigError(
                f"Invalid experiment configuration: {group}.name={name!r} does not select an "
                f"option: use {group}={name} (the option sets its name, keys and defaults)."
            )
        source = getattr(node, "source", None)  # dataset: each source has its own schema
        fixed = OmegaConf.structured(options[name]).get("source")
        if source != fixed:
            raise ConfigError(
                f"Invalid experiment configuration: {group}.source={source!r}: {group}={name} "
                f"reads {fixed} data; pick a {group} option of that source instead."
            )


def _check_known_keys(cfg: DictConfig) -> None:
    """Refuse keys that no schema declares (`+training.lrr=1`), listing the valid names, and
    keys of another option of the group (`+privacy.target_quantile=1` under server_fixed)."""

    def walk(node, prefix: str) -> None:
        if not isinstance(node, DictConfig):
            return
        schema = OmegaConf.get_type(node)
        if not dataclasses.is_dataclass(schema):
            return
        fields = {f.name for f in dataclasses.fields(schema)}
        for key in node.keys():
            name = f"{prefix}{key}"
            if key not in fields:
                group = prefix[:-1]
                if group in OPTIONS and node.get("name") in OPTIONS[group]:
                    foreign = foreign_key_message(group, node.name, key, OPTIONS[group])
                    if foreign:
                        raise ConfigError(foreign)
                valid = ", ".join(sorted(fields))
                where = f"'{group}'" if prefix else "the top level"
                raise ConfigError(
                    f"Invalid experiment configuration: '{name}' is not a key of the "
                    f"experiment configuration (a '+' override adds a key no part of the run "
                    f"reads). Valid keys at {where}: {valid}."
                )
            walk(node._get_node(key), f"{name}.")

    walk(cfg, "")


def _explain(err: Exception, overrides: tuple[str, ...]) -> str:
    msg = str(err).strip()
    if err.__cause__ is not None and str(err.__cause__) not in msg:
        msg = f"{msg}: {str(err.__cause__).strip()}"  # Hydra keeps the detail in the cause
    if msg.startswith("Could not override"):
        # Hydra suggests `+key=value`, which our schemas would reject anyway: say what is true.
        key = msg.split("'")[1]
        foreign = _foreign_key(key, overrides)
        if foreign:
            return foreign
        msg = f"'{key}' is not a key of the experiment configuration."
    # Drop Hydra's search-path dump: it names folders, not what the user can change.
    msg = msg.split("Config search path:")[0].strip()
    options = "; ".join(f"{g}={'|'.join(sorted(OPTIONS[g]))}" for g in sorted(OPTIONS))
    given = f" (overrides: {' '.join(overrides)})" if overrides else ""
    return (
        f"Invalid experiment configuration{given}: {msg}\n"
        f"Config groups and their options: {options}. Keys and defaults: the option schemas in "
        "core/config.py, protections/dp/config.py and protections/he/config.py."
    )


def _foreign_key(key: str, overrides: tuple[str, ...]) -> str | None:
    """The error for `group.key=...` when the key belongs to another option of the group: the
    chosen option is read from a composition of the overrides' group selections alone."""
    group, _, sub = key.partition(".")
    if group not in OPTIONS or not sub or "." in sub:
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    selections = tuple(o.input_line for o in parsed if o.key_or_group in OPTIONS)
    option = _compose_cached(selections)[group].get("name")
    if option not in OPTIONS[group]:
        return None
    return foreign_key_message(group, option, sub, OPTIONS[group])
