"""Fine-tuning: start from a pretrained checkpoint and train (and send) only some tensors.

`model.pretrained=<path>` loads a checkpoint written by `python -m app.pretrain`;
`model.trainable=all|head|<module names>` picks the tensors that train. The others are frozen
(`requires_grad=False`) on every party, identical everywhere because every party loads the
same checkpoint, so they never travel: the wire model (what the server sends, what clients
return, what HE encrypts, what compression quantizes) is the list of trainable tensors in
`state_dict` order (`wire_names`). Both sides derive that list from the same config, and the HE
payload's layout tag covers its shapes.

A checkpoint records the architecture it was trained for and the data shape; loading it into
a model of another architecture, or one whose tensors differ in name or shape, is a
`FineTuneError` that names the differences (raised by config validation, before training).

LoRA (`model.lora.r > 0`): after the checkpoint is loaded, peft's `inject_adapter_in_model`
wraps the targeted Linear layers (`model.lora.target`: all of them by default) in
`lora.Linear` modules: the base weights (`<layer>.base_layer.*`) are frozen and each layer gains
`<layer>.lora_A.default.weight` (r x in) and `<layer>.lora_B.default.weight` (out x r). The wire
is those adapter tensors, plus the base tensors of the modules `model.trainable` names (`all`,
the default, adds none: under LoRA the base model is frozen by construction; `head` adds the
last Linear layer's weight and bias). peft initialises B to zero, so the initial model equals
the base, and A randomly: A is drawn from a generator seeded by `seed` alone (every party passes
the experiment seed), so all parties build identical adapters before any message. The saved
final model is the merged one (`merged_model`: W + alpha/r * B @ A folded into each base layer),
with the same tensor names as the model without LoRA.

model=hf (core/hf_model.py): `head` is the transformers model's task head (its modules outside
the base model, all of them), and `model.lora.target` takes peft's name patterns
(`hf_lora_targets`): the adapters plus the trainable head are the wire.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import copy
import re

import torch
from torch import nn

from core.config import CNNModelConfig, LoraConfig, MLPModelConfig, ModelConfig
from core.data import DataSpec
from core.hf_model import HFClassifier
from core.models import build_model

CHECKPOINT_FORMAT = "flower-private-finetune checkpoint v1"
HEAD = "head"
ALL = "all"


class FineTuneError(ValueError):
    """A checkpoint or trainable selection that does not fit the configured model."""


def architecture(cfg: ModelConfig) -> dict[str, Any]:
    """The part of the model config that decides tensor names and shapes (the keys this
    model=<option> has: hidden_sizes for mlp and cnn, channels for cnn)."""
    arch: dict[str, Any] = {"name": cfg.name}
    if isinstance(cfg, MLPModelConfig):
        arch["hidden_sizes"] = list(cfg.hidden_sizes)
    if isinstance(cfg, CNNModelConfig):
        arch["channels"] = list(cfg.channels)
    return arch


def save_checkpoint(
    path: Path, model: nn.Module, cfg: ModelConfig, spec: DataSpec, meta: dict[str, Any]
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "model": architecture(cfg),
            "data_spec": asdict(spec),
            "state_dict": model.state_dict(),
            "meta": meta,
        },
        path,
    )
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FineTuneError(
            f"model.pretrained={path}: no such file; write one with "
            "`python -m app.pretrain --out <abs path> dataset.public_fraction=0.2`"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise FineTuneError(f"model.pretrained={path}: not a readable checkpoint ({err})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise FineTuneError(
            f"model.pretrained={path} is not a checkpoint of `python -m app.pretrain` "
            f"(expected format {CHECKPOINT_FORMAT!r})"
        )
    return ckpt


def load_pretrained(model: nn.Module, path: str | Path, cfg: ModelConfig, spec: DataSpec) -> dict:
    """Load the checkpoint at `path` into `model`; its metadata is returned."""
    ckpt = read_checkpoint(path)
    problems = []
    arch = architecture(cfg)
    # On this model's keys only: checkpoints written before each model option had its own
    # schema also recorded hidden_sizes and channels of models that have none.
    if {k: ckpt["model"].get(k) for k in arch} != arch:
        problems.append(f"it was trained for model {ckpt['model']}, this run builds {arch}")
    if ckpt["data_spec"] != asdict(spec):
        problems.append(f"its data shape is {ckpt['data_spec']}, this run's is {asdict(spec)}")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing:
        problems.append(f"tensors missing from the checkpoint: {missing}")
    if unexpected:
        problems.append(f"tensors the model does not have: {unexpected}")
    shapes = [f"{k}: checkpoint {got[k]}, model {want[k]}" for k in want if k in got and got[k] != want[k]]
    if shapes:
        problems.append(f"shape mismatches: {shapes}")
    if problems:
        raise FineTuneError(
            f"model.pretrained={path} does not fit this model: " + "; ".join(problems)
            + ". Use the same model= and dataset= as `python -m app.pretrain` did."
        )
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return ckpt.get("meta", {})


def head_module(model: nn.Module) -> str:
    """Name of the last Linear layer (the classifier / regression head)."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise FineTuneError("model.trainable=head: this model has no Linear layer")
    return linears[-1]


def trainable_modules(model: nn.Module, trainable: str) -> list[str] | None:
    """The module names `model.trainable` selects (None: all), resolved on the model before
    any LoRA wrapping, so `head` is the base model's last Linear layer."""
    if trainable.strip() == ALL:
        return None
    wanted = [n.strip() for n in trainable.split(",") if n.strip()]
    if not wanted:
        raise FineTuneError("model.trainable is empty: use all, head or module names")
    modules = dict(model.named_modules())
    prefixes = []
    for name in wanted:
        if name == HEAD and isinstance(model, HFClassifier):  # model=hf: its whole task head
            prefixes.extend(model.head_modules())
            continue
        name = head_module(model) if name == HEAD else name
        if name not in modules or name == "":
            choices = [n for n in modules if n]
            raise FineTuneError(
                f"model.trainable: {name!r} is not a module of this model; use all, head or "
                f"names from {choices}"
            )
        prefixes.append(name)
    return prefixes


def _select(keys: list[str], prefixes: list[str]) -> list[str]:
    return [k for k in keys if any(k == p or k.startswith(p + ".") for p in prefixes)]


def trainable_names(model: nn.Module, trainable: str) -> list[str]:
    """The `state_dict` keys that train and travel, in `state_dict` order."""
    keys = list(model.state_dict())
    prefixes = trainable_modules(model, trainable)
    if prefixes is None:
        return keys
    names = _select(keys, prefixes)
    if not names:
        raise FineTuneError(f"model.trainable={trainable!r} selects no tensor (modules without parameters)")
    return names


def linear_modules(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def hf_lora_targets(model: HFClassifier, target: str) -> list[str]:
    """model=hf: the modules `model.lora.target` names, read as peft reads `target_modules`
    names (a pattern matches a module whose name is it or ends in "." + it: `query` adapts
    every attention query projection), outside the task head (which trains whole under
    trainable=head; `all`: every Linear layer outside the head). Resolved here and handed to
    peft as exact names because peft's own matching cannot leave the head out."""
    head = model.head_modules()
    outside = [
        (name, module)
        for name, module in model.named_modules()
        if name and not any(name == h or name.startswith(h + ".") for h in head)
    ]
    if target.strip() == ALL:
        return [n for n, m in outside if isinstance(m, nn.Linear)]
    wanted = [p.strip() for p in target.split(",") if p.strip()]
    chosen: list[str] = []
    for pattern in wanted:
        matched = [n for n, _ in outside if n == pattern or n.endswith("." + pattern)]
        if not matched:
            linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in outside if isinstance(m, nn.Linear)})
            raise FineTuneError(
                f"model.lora.target={target!r}: {pattern!r} matches no module of this model "
                f"outside its head {head}; LoRA adapts layers by name (or name suffix): use "
                f"all or names from {linear_names}"
            )
        chosen += [n for n in matched if n not in chosen]
    return chosen


def lora_targets(model: nn.Module, target: str) -> list[str]:
    """The Linear modules `model.lora.target` names (`all`: every Linear layer)."""
    if isinstance(model, HFClassifier):
        return hf_lora_targets(model, target)
    linears = linear_modules(model)
    if target.strip() == ALL:
        return linears
    wanted = [n.strip() for n in target.split(",") if n.strip()]
    wrong = [n for n in wanted if n not in linears]
    if not wanted or wrong:
        raise FineTuneError(
            f"model.lora.target={target!r}: {wrong or 'nothing'} not a Linear module of this "
            f"model; LoRA adapts Linear layers: use all or names from {linears}"
        )
    return wanted


def add_lora(model: nn.Module, lora: LoraConfig, seed: int | None) -> list[str]:
    """Wrap the targeted Linear layers with peft LoRA adapters (in place); returns the names of
    the adapter tensors. A (peft: Kaiming-uniform) is drawn under `seed` in a forked RNG, so
    every party gets the same adapters and the caller's RNG stream is left as it was."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    targets = lora_targets(model, lora.target)
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=0.0,  # no dropout: DP-SGD and the wire need a deterministic module tree
        bias="none",
        # a regex is matched in full by peft, so "0" names module 0 only, not every "*.0"
        target_modules="|".join(f"(?:{re.escape(t)})" for t in targets),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0 if seed is None else seed)
        try:
            inject_adapter_in_model(config, model)
        except ValueError as err:  # peft: a module type it cannot adapt (model=hf patterns)
            raise FineTuneError(f"model.lora.target={lora.target!r}: peft refused it: {err}") from err
    return [k for k in model.state_dict() if is_adapter(k)]


def is_adapter(key: str) -> bool:
    """A peft LoRA adapter tensor: lora_A/lora_B of an adapted Linear (or Conv) layer,
    lora_embedding_A/B of an adapted Embedding (model=hf patterns may name embeddings)."""
    return re.search(r"\.lora_(?:embedding_)?[AB]\.", key) is not None


def merged_model(model: nn.Module) -> nn.Module:
    """A copy of `model` with every LoRA adapter merged into its base layer and the wrapper
    replaced by that layer: plain Linear layers with the names and shapes of the model without
    LoRA (what `model.pt` and `model_int8.pt` hold). A model without adapters is returned as is.
    peft's `merge_and_unload` lives on its tuner wrapper, which `inject_adapter_in_model` does
    not return; this does the same with the layers' public `merge()` / `get_base_layer()`."""
    if not any(is_adapter(k) for k in model.state_dict()):
        return model
    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(model)
    wrapped = [(n, m) for n, m in merged.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in wrapped:
        layer.merge(safe_merge=True)
        parent, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent) if parent else merged, child, layer.get_base_layer())
    for param in merged.parameters():
        param.requires_grad_(True)
    return merged


def freeze_except(model: nn.Module, names: list[str]) -> None:
    keep = set(names)
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)


def build_finetune_model(
    cfg: ModelConfig, spec: DataSpec, seed: int | None = None
) -> tuple[nn.Module, list[str]]:
    """The configured model (from its checkpoint when `model.pretrained` is set, with LoRA
    adapters when `model.lora.r > 0`) with the non-trainable tensors frozen, and the names of
    the tensors that travel (the wire). Every party passes the experiment seed."""
    model = build_model(cfg, spec, seed=seed)
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained, cfg, spec)
    if cfg.lora.r <= 0:
        names = trainable_names(model, cfg.trainable)
        freeze_except(model, names)
        return model, names
    prefixes = trainable_modules(model, cfg.trainable) or []
    adapters = add_lora(model, cfg.lora, seed)
    keys = list(model.state_dict())
    chosen = set(adapters) | set(_select(keys, prefixes))
    names = [k for k in keys if k in chosen]  # state_dict order
    freeze_except(model, names)
    return model, names
