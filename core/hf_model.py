"""model=hf: a Hugging Face transformers model behind the interface every other model has.

The rest of the code (training, DP-SGD, evaluation, the wire) calls `model(x)` on a batch of
one float or integer array and reads logits back. `HFClassifier` is that adapter around a
transformers model loaded with the Auto classes:
- dataset=text (core/text.py): `x` holds each example's token ids and attention mask side by
  side, (n, 2 * max_length) int64. Both travel with the data instead of the mask being
  rebuilt from a pad id here, which the tokenizer and the model config need not agree on.
  The model is `AutoModelForSequenceClassification`.
- image data sets (digits, mnist, cifar10): `x` is the flattened image, reshaped to the data
  spec's (C, H, W) as `pixel_values` of `AutoModelForImageClassification`; the model's
  config.json must be for that image size and channel count.

Every party builds the same model: the base weights are read from `model.name_or_path` (the
same directory or hub revision everywhere), the new task head (sized `num_labels` = the data
set's classes; a checkpoint's head of another size is replaced, `ignore_mismatched_sizes`) is
initialised from torch's global generator, which `core.models.build_model` seeds with the
experiment seed. The head is the model's modules outside its base model
(`base_model_prefix`: BERT's `classifier`, DistilBERT's `pre_classifier` and `classifier`):
`model.trainable=head` names them, core/finetune.py.

Loading never waits for a network that is not there: with HF_HUB_OFFLINE set (read when the
model is built, so a test or a site can set it late) only local files and the Hugging Face
cache are read; an id that cannot be loaded is an `HFModelError` naming the config key and the
fix, raised while the config is validated (core/config_checks.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from core.config import HFModelConfig
from core.data_types import DataSpec

_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's reading of its boolean variables


class HFModelError(ValueError):
    """A model.name_or_path (or a tokenizer) that cannot be loaded: the message says why and
    what to set instead."""


def hub_offline() -> bool:
    """Whether the hub may not be contacted: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as the
    environment holds it now. huggingface_hub reads these once, at its import; passing
    `local_files_only` from this reading honours a value set later too."""
    return any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _quiet_transformers() -> None:
    """transformers logs a load report (the re-initialised head) and a progress bar per
    load; a client builds its model once per process, a simulation has hundreds."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def from_pretrained(loader, name_or_path: str, key: str, **kwargs):
    """`loader.from_pretrained(name_or_path, **kwargs)`, or an HFModelError naming `key`.

    A path (absolute, or starting with ~ or .) must be a directory: transformers would
    otherwise try it as a hub id and answer with a message about repository names. A hub id is
    looked up in the cache only when offline (`hub_offline`)."""
    _quiet_transformers()
    fix = (
        f"point {key} at an absolute local directory holding config.json and the weights "
        "(what save_pretrained writes), or run once with network access (HF_HUB_OFFLINE "
        "unset) so that the hub id is downloaded into the Hugging Face cache"
    )
    looks_like_path = name_or_path.startswith(("/", "~", "."))  # a hub id is "org/name"
    path = Path(name_or_path).expanduser()
    if looks_like_path and not path.is_dir():
        raise HFModelError(f"{key}={name_or_path!r}: no such directory: {fix}")
    offline = hub_offline() and not path.is_dir()
    if offline and "Model" in loader.__name__:
        # transformers 5.24's Auto classes look for a peft adapter config without passing
        # local_files_only on, and retry the hub for ~20 s: pass it to that lookup too
        kwargs["adapter_kwargs"] = {"local_files_only": True}
    try:
        return loader.from_pretrained(
            str(path) if path.is_dir() else name_or_path, local_files_only=offline, **kwargs
        )
    except (OSError, ValueError) as err:  # transformers: OSError; hub id syntax: ValueError
        if path.is_dir():
            where = "a local directory, but not one transformers can load as this model"
        elif offline:
            where = "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache"
        else:
            where = "no such local directory, and the hub could not be reached or has no such model"
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise HFModelError(
            f"{key}={name_or_path!r} could not be loaded ({where}; {type(err).__name__}: "
            f"{detail}): {fix}"
        ) from err


class HFClassifier(nn.Module):
    """A transformers classifier called as `model(x)` -> logits (see the module docstring)."""

    def __init__(self, hf: nn.Module, spec: DataSpec):
        super().__init__()
        self.hf = hf
        self.image_shape = spec.image_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.image_shape is not None:
            pixels = x.view(-1, *self.image_shape).to(self.hf.dtype)
            return self.hf(pixel_values=pixels).logits
        input_ids, attention_mask = x.long().chunk(2, dim=1)
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).logits

    def head_modules(self) -> list[str]:
        """Names (in this module) of the task head: the transformers model's children
        outside its base model, those with parameters."""
        prefix = self.hf.base_model_prefix
        return [
            f"hf.{name}"
            for name, child in self.hf.named_children()
            if name != prefix and any(True for _ in child.parameters())
        ]


def build_hf_model(cfg: HFModelConfig, spec: DataSpec) -> HFClassifier:
    """The transformers model of `cfg.name_or_path` with a `spec.num_outputs`-class head
    (the caller seeds torch's generator: the head's initial weights)."""
    if spec.task != "classification":
        raise HFModelError("model=hf builds classifiers: use a classification data set")
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    auto = AutoModelForImageClassification if spec.image_shape else AutoModelForSequenceClassification
    hf = from_pretrained(
        auto,
        cfg.name_or_path,
        "model.name_or_path",
        num_labels=spec.num_outputs,
        ignore_mismatched_sizes=True,  # a checkpoint's head for other classes is replaced
    )
    hf.float()  # float32 weights: AMP autocasts per op, Opacus needs float32 gradients
    return HFClassifier(hf, spec)
