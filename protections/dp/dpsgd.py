"""Sample-level DP: local training with Opacus DP-SGD.

Randomness. The Poisson batch masks and the Gaussian noise are what make DP-SGD private, so
they come from a generator seeded with 64 bits of OS entropy (`private_generator`) that
exists only inside this call: nobody, the server included, can replay them. (The seeds of
model init and everything else are public: derived from `seed` in the config, the partition
and the round; a replay with them once told whether one example was present in 20 of 20
trials at a claimed epsilon of 0.61.) Opacus' own `secure_mode` would do the same with
torchcsprng, which is not published for this torch. A DP-SGD run is therefore not
reproducible, by design; everything not privacy-relevant stays seeded.

Each client's privacy loss accumulates over every round it takes part in. Opacus' RDP
accountant keeps a history of (noise multiplier, sample rate, steps); that history lives in
the client's Flower `Context.state` between rounds (the ClientApp object itself is rebuilt for
every message), so the accountant is restored, never restarted.
"""

from __future__ import annotations

import json
import os

import torch
from protections.dp.opacus_import import import_opacus_quietly

import_opacus_quietly()  # before any opacus import: no duplicated log lines

from opacus import PrivacyEngine  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402
from opacus.data_loader import DPDataLoader  # noqa: E402
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from core.config import TrainingConfig
from core.data import ArraySplit
from core.evaluation import loss_fn
from core.training import TrainResult, make_optimizer
from protections.dp.config import DPSGDConfig

HISTORY_KEY = "history"


def noise_multiplier_for(
    privacy: DPSGDConfig, sample_rate: float, local_epochs: int, max_rounds: int
) -> float:
    """The configured z, or the z with which a client that takes part in all `max_rounds`
    rounds (local_epochs / sample_rate steps each) spends exactly `target_epsilon`: the worst
    case, so no client can exceed its target however often it is sampled."""
    if privacy.target_epsilon is None:
        return privacy.noise_multiplier
    steps = steps_per_epoch(sample_rate) * local_epochs * max(1, max_rounds)
    return get_noise_multiplier(
        target_epsilon=privacy.target_epsilon,
        target_delta=privacy.target_delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant="rdp",
    )


def steps_per_epoch(sample_rate: float) -> int:
    """Opacus' Poisson sampler takes int(1 / q) steps per epoch: public, like q itself."""
    return int(1 / sample_rate)


def private_generator(device: torch.device) -> torch.Generator:
    """A torch generator seeded from 64 bits of OS entropy: unpredictable to anyone who knows
    the config (guessing it means searching 2^64 seeds)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return generator


def train_dpsgd(
    model: nn.Module,
    data: ArraySplit,
    training: TrainingConfig,
    privacy: DPSGDConfig,
    task: str,
    device: torch.device,
    seed: int,
    history_json: str,
    max_rounds: int,
) -> tuple[TrainResult, float, str]:
    """Train with DP-SGD; returns (result, epsilon so far, accountant history as JSON)."""
    if privacy.target_delta >= 1 / len(data):
        # No count in the message: failure reasons reach the server and results.json.
        raise ValueError(
            f"privacy.target_delta={privacy.target_delta} is not below 1/n for this client's "
            "number of training examples n: use a smaller delta"
        )
    torch.manual_seed(seed)  # public: nothing private is drawn from the global generator
    dataset = TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y))
    loader = DataLoader(dataset, batch_size=training.batch_size)  # make_private's input only
    # Every quantity the released model depends on, other than the data through the clipped
    # sum, is public: each example joins a step with probability q = privacy.sample_rate,
    # int(1/q) steps per epoch, and the noised sum is divided by training.batch_size. Opacus'
    # defaults (q = 1/ceil(n/B), divisor n*q) are functions of the client's data-set size n,
    # which add/remove-one-example neighbours differ in: the noise scale alone told n.
    sample_rate = privacy.sample_rate
    z = noise_multiplier_for(privacy, sample_rate, training.local_epochs, max_rounds)
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = [tuple(h) for h in json.loads(history_json or "[]")]
    model.to(device).train()
    private_model, optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=make_optimizer(model, training),
        data_loader=loader,
        noise_multiplier=z,
        max_grad_norm=privacy.max_grad_norm,
        poisson_sampling=True,
        noise_generator=private_generator(device),
    )
    private_loader = DPDataLoader(
        dataset, sample_rate=sample_rate, generator=private_generator(torch.device("cpu"))
    )
    optimizer.expected_batch_size = training.batch_size
    optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    criterion = loss_fn(task)
    steps, total_loss, seen, correct = 0, 0.0, 0, 0
    for _ in range(training.local_epochs):
        total_loss, seen, correct = 0.0, 0, 0
        for x, y in private_loader:
            if len(y) == 0:
                # Poisson sampling drew no example (probability (1-q)^n, ~1e-7 at the sizes
                # here); Opacus' optimizer cannot step without per-sample gradients.
                continue
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            out = private_model(x)
            loss = criterion(out, y)
            loss.backward()
            optimizer.step()
            steps += 1
            total_loss += float(loss.detach()) * len(y)
            seen += len(y)
            if task == "classification":
                correct += int((out.detach().argmax(dim=1) == y).sum())
    epsilon = engine.get_epsilon(privacy.target_delta)
    history = json.dumps([list(h) for h in engine.accountant.history])
    private_model._close()  # remove Opacus' hooks from the caller's model
    accuracy = correct / seen if task == "classification" and seen else None
    result = TrainResult(total_loss / max(seen, 1), accuracy, len(data), steps)
    return result, epsilon, history
