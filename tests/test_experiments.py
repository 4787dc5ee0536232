"""Whole experiments in this process (tests/support/rounds.py: the ServerApp's round loop, the
configured strategy stack, real clients, the real recorder): what each server-side option
does over several rounds, checked in the unit tier. The `flwr run` path of the same options
is the e2e tier's (tests/test_e2e_simulation.py: the client-side accountants `local` and
`dpsgd`, whose state lives in Flower's contexts; tests/test_checkpoint.py: server_fixed;
tests/test_deploy.py: secagg=he with client_fixed)."""

import pytest
import torch

from core.results import MODEL_FILE
from tests.support.rounds import in_process_run


@pytest.mark.parametrize(
    "privacy",
    [
        "privacy=server_fixed privacy.noise_multiplier=0.5",
        "privacy=client_fixed privacy.noise_multiplier=0.5",
        "privacy=adaptive privacy.noise_multiplier=0.3 privacy.clipped_count_stddev=1.0",
    ],
)
def test_every_server_accounted_privacy_option_reports_a_growing_epsilon(tmp_path, privacy):
    run = in_process_run(f"{privacy} model=linear num_rounds=3", tmp_path, num_nodes=4).fit().finish()
    record = run.recorder.record
    assert [r.round for r in record.rounds] == [1, 2, 3]
    epsilons = [r.privacy.epsilon for r in record.rounds]
    assert all(r.privacy.delta == 1e-5 for r in record.rounds)
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2]  # one release per round, composed
    assert record.final.rounds_completed == 3 and record.final.privacy.epsilon == epsilons[-1]


def test_privacy_budget_ends_the_run_and_says_why(tmp_path):
    overrides = "privacy=server_fixed privacy.noise_multiplier=2.0 privacy.epsilon_budget=3.0"
    run = in_process_run(f"{overrides} model=linear num_rounds=10", tmp_path, num_nodes=4).fit().finish()
    final = run.recorder.record.final
    # q = 2/4, z = 2: epsilon 2.81 after round 4, 3.12 after round 5 (dp-accounting)
    assert final.rounds_completed == 4
    assert final.stop_reason.startswith("privacy budget: round 5")
    assert 2.7 < final.privacy.epsilon <= 3.0


def test_linear_regression_recovers_slope_and_intercept(tmp_path):
    run = in_process_run("dataset=linear model=linear num_rounds=5", tmp_path, num_nodes=4,
                         centralized_test=True).fit().finish()  # fmt: skip
    state = torch.load(tmp_path / MODEL_FILE)
    assert state["0.weight"].item() == pytest.approx(2.0, abs=0.1)
    assert state["0.bias"].item() == pytest.approx(1.0, abs=0.1)
    final = run.recorder.record.final
    assert "accuracy" not in final.centralized
    assert final.centralized["loss"] < 0.05  # noise variance is 0.01


def test_he_with_client_level_dp_aggregates_every_sampled_client_and_reports_epsilon(tmp_path):
    overrides = "secagg=he privacy=client_fixed privacy.noise_multiplier=0.5 model=linear num_rounds=3"
    run = in_process_run(overrides, tmp_path, num_nodes=4).fit()
    rounds = run.recorder.record.rounds
    epsilons = [r.privacy.epsilon for r in rounds]
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2]
    assert [r.secagg.clients_aggregated for r in rounds] == [2, 2, 2]  # fraction_train 0.5 of 4
    assert all(r.centralized is None for r in rounds)  # the server cannot read the model
