import numpy as np
import pytest
import torch

from app.config import load_config
from core.data import centralized_test_split, data_spec, load_client_data
from core.evaluation import evaluate
from core.models import build_model, get_weights, num_parameters, set_weights
from core.training import train

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")


@pytest.mark.parametrize("model", ["linear", "mlp", "cnn"])
def test_parameters_round_trip_in_state_dict_order(model):
    cfg = load_config(f"model={model}")
    spec = data_spec(cfg.dataset)
    a = build_model(cfg.model, spec, seed=1)
    b = build_model(cfg.model, spec, seed=2)
    assert not all(np.array_equal(x, y) for x, y in zip(get_weights(a), get_weights(b)))
    set_weights(b, get_weights(a))
    for x, y in zip(get_weights(a), get_weights(b)):
        np.testing.assert_array_equal(x, y)
    x = torch.from_numpy(centralized_test_split(cfg.dataset, 0).x[:5])
    torch.testing.assert_close(a(x), b(x))


def test_same_seed_same_initial_model():
    cfg = load_config("model=cnn")
    spec = data_spec(cfg.dataset)
    for x, y in zip(get_weights(build_model(cfg.model, spec, 0)), get_weights(build_model(cfg.model, spec, 0))):
        np.testing.assert_array_equal(x, y)


def test_set_weights_rejects_mismatches():
    cfg = load_config("model=mlp")
    spec = data_spec(cfg.dataset)
    model = build_model(cfg.model, spec)
    weights = get_weights(model)
    with pytest.raises(ValueError, match="Received 3 arrays for a model with 4 tensors"):
        set_weights(model, weights[:3])
    weights[0] = np.zeros((2, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="received shape"):
        set_weights(model, weights)


def test_model_sizes():
    cfg = load_config("")
    spec = data_spec(cfg.dataset)
    assert num_parameters(build_model(load_config("model=linear").model, spec)) == 64 * 10 + 10
    assert num_parameters(build_model(cfg.model, spec)) == 64 * 64 + 64 + 64 * 10 + 10


@pytest.mark.parametrize(
    "overrides", ["model=mlp", "model=cnn training.optimizer=adam training.lr=0.005 training.local_epochs=5", "dataset=breast_cancer"]
)
def test_local_training_lowers_the_loss(overrides):
    cfg = load_config(overrides)
    spec = data_spec(cfg.dataset)
    model = build_model(cfg.model, spec, seed=0)
    train_data, _ = load_client_data(cfg.dataset, cfg.partitioner, 0, 10, cfg.seed)
    before = evaluate(model, train_data, spec.task, CPU)["loss"]
    result = train(model, train_data, cfg.training, spec.task, CPU, seed=0)
    after = evaluate(model, train_data, spec.task, CPU)["loss"]
    assert after < 0.7 * before
    assert result.num_examples == len(train_data)  # examples, not batches
    expected_steps = cfg.training.local_epochs * -(-len(train_data) // cfg.training.batch_size)
    assert result.steps == expected_steps


def test_fedprox_term_keeps_weights_closer_to_the_global_model():
    cfg = load_config("")
    spec = data_spec(cfg.dataset)
    train_data, _ = load_client_data(cfg.dataset, cfg.partitioner, 0, 10, cfg.seed)
    start = get_weights(build_model(cfg.model, spec, seed=0))

    def drift(mu: float) -> float:
        model = build_model(cfg.model, spec)
        set_weights(model, start)
        train(model, train_data, cfg.training, spec.task, CPU, seed=0, proximal_mu=mu)
        return float(sum(np.sum((w - s) ** 2) for w, s in zip(get_weights(model), start)))

    assert drift(1.0) < 0.8 * drift(0.0)


def test_regression_training_fits_the_line():
    cfg = load_config("dataset=linear model=linear training.local_epochs=20")
    spec = data_spec(cfg.dataset)
    model = build_model(cfg.model, spec, seed=0)
    train_data, _ = load_client_data(cfg.dataset, cfg.partitioner, 0, 1, cfg.seed)
    train(model, train_data, cfg.training, spec.task, CPU, seed=0)
    weight, bias = get_weights(model)
    assert weight.item() == pytest.approx(2.0, abs=0.1) and bias.item() == pytest.approx(1.0, abs=0.1)
