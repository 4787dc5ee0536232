"""Experiment tracking (app/tracking.py): a run driven through the real round loop reads back
from MLflow with the numbers results.json has; a store that cannot be written, or a server
that is down, leaves the run completed with the failure recorded; the tracking keys are
checked at config time.

The SQLite store is created once for this module (MLflow's schema migrations take 5-12 s) and
copied for each test; the module's tests run on one xdist worker.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

import pytest
from omegaconf import OmegaConf

from app.config import load_config
from app.sweep import flwr_run_command
from app.tracking import MLFLOW_ENV_DEFAULTS, config_params, start_tracking, tracking_uri
from core.config import TRACKING_ENV, ConfigError, TrackingConfig, resolved_yaml
from core.results import load_results
from tests.support.rounds import in_process_run

pytestmark = pytest.mark.xdist_group("mlflow")
EXPERIMENT = "tests"


@pytest.fixture(autouse=True)
def mlflow_env(monkeypatch):
    """What start_tracking sets in the ServerApp's process, here for this test only."""
    for key, value in MLFLOW_ENV_DEFAULTS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()  # creates the schema
    return path


@pytest.fixture
def store(empty_store, tmp_path):
    """A fresh SQLite store for this test: (its URI, a client of it)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path / "store" / "mlflow.db"
    path.parent.mkdir()
    shutil.copy(empty_store, path)
    uri = f"sqlite:///{path}"
    return uri, MlflowClient(tracking_uri=uri)


def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(flat(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def test_a_tracked_run_reads_back_from_mlflow_as_results_json_has_it(store, tmp_path):
    uri, client = store
    out, sweep = tmp_path / "multirun" / "0", tmp_path / "multirun"
    overrides = (
        f"model=linear privacy=server_fixed privacy.noise_multiplier=0.8 num_rounds=3 "
        f"tracking.enabled=true tracking.uri={uri} tracking.experiment={EXPERIMENT}"
    )
    cfg = load_config(overrides)
    tracker = start_tracking(cfg, tmp_path / "unused", out, token="t", flwr_run_id=42,
                             sweep_dir=str(sweep))  # fmt: skip
    # the round loop over two in-process clients, then the ServerApp's end of run
    in_process_run(f"{overrides} strategy.fraction_train=1.0", out, observer=tracker).fit().finish()

    results = load_results(out)
    assert results.run.status == "completed"
    info = results.run.tracking
    assert (info.uri, info.experiment, info.error) == (uri, EXPERIMENT, None)
    (run,) = client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id],
        filter_string=f"tags.sweep = '{sweep}'",  # a sweep's jobs are found by their tag
    )
    assert run.info.run_id == info.run_id and run.info.status == "FINISHED"
    assert run.info.run_name == "multirun/0"
    tags = run.data.tags
    assert (tags["run.token"], tags["flwr.run_id"], tags["sweep.job"]) == ("t", "42", "0")
    assert tags["output_dir"] == str(out)

    # params: config.yaml, flattened
    params = run.data.params
    assert params["privacy.noise_multiplier"] == "0.8" and params["privacy.name"] == "server_fixed"
    assert params["num_rounds"] == "3" and params["tracking.uri"] == uri
    saved = flat(OmegaConf.to_container(OmegaConf.load(out / "config.yaml")))
    assert params == {k: v if isinstance(v, str) else json.dumps(v) for k, v in saved.items()}

    # metrics: every number of every round, step = round, equal to results.json's
    data = json.loads((out / "results.json").read_text())
    expected: dict[str, list] = {}
    for r in data["rounds"]:
        for key, value in flat(r).items():
            if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool):
                expected.setdefault(key, []).append((r["round"], float(value)))
    for key, value in data["initial"]["centralized"].items():
        expected[f"centralized.{key}"].insert(0, (0, value))
    for key, value in flat(data["final"], "final").items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            expected[key] = [(3, float(value))]
    for key in ("centralized.accuracy", "centralized.loss", "privacy.epsilon", "privacy.delta",
                "comm.bytes_up", "comm.bytes_down", "seconds", "final.comm_total.bytes_up"):  # fmt: skip
        assert key in expected, key
    got = {
        key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                key=lambda m: m.step)]  # fmt: skip
        for key in run.data.metrics
    }
    assert got == expected
    epsilons = [e for _, e in got["privacy.epsilon"]]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0  # accounted, growing

    # artifacts: the run's files, byte for byte
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == [
        "config.yaml", "metrics.png", "model.pt", "model_int8.pt", "results.json",
    ]  # fmt: skip
    copy = client.download_artifacts(run.info.run_id, "results.json", str(tmp_path / "dl"))
    assert open(copy).read() == (out / "results.json").read_text()


def test_federated_metrics_measured_a_round_later_reach_mlflow_at_their_round(store, tmp_path):
    """strategy.evaluate_with_train records round r's federated evaluation during round r+1
    (RunRecorder.update_round): MLflow gets it at step r, once."""
    uri, client = store
    overrides = (
        "model=linear num_rounds=3 strategy.fraction_train=1.0 strategy.evaluate_with_train=true "
        f"tracking.enabled=true tracking.uri={uri} tracking.experiment={EXPERIMENT}"
    )
    out = tmp_path / "run"
    tracker = start_tracking(load_config(overrides), tmp_path, out, token="t")
    in_process_run(overrides, out, observer=tracker).fit().finish()
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    history = client.get_metric_history(run.info.run_id, "federated.accuracy")
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    assert sorted((m.step, m.value) for m in history) == [
        (r["round"], r["federated"]["accuracy"]) for r in rounds
    ]


def test_a_failed_run_is_failed_in_mlflow_with_its_reason(store, tmp_path):
    uri, client = store
    cfg = load_config(f"tracking.enabled=true tracking.uri={uri} tracking.experiment={EXPERIMENT}")
    tracker = start_tracking(cfg, tmp_path, tmp_path / "run", token="t")
    from core.results import RunRecorder

    recorder = RunRecorder(tmp_path / "run", cfg, token="t", observer=tracker)
    recorder.fail("RunFailed: no client update was aggregated")
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RunFailed: no client update was aggregated"
    assert run.data.params["num_rounds"] == "10"  # the config of a run that failed early
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == [
        "config.yaml", "results.json",
    ]  # fmt: skip
    assert load_results(tmp_path / "run").run.tracking.run_id == run.info.run_id


def test_a_store_that_cannot_be_written_leaves_the_run_completed_with_one_warning(tmp_path, caplog):
    (tmp_path / "file").write_text("not a directory")
    uri = f"sqlite:///{tmp_path / 'file' / 'mlflow.db'}"
    overrides = f"model=linear num_rounds=2 tracking.enabled=true tracking.uri={uri}"
    cfg = load_config(overrides)
    tracker = start_tracking(cfg, tmp_path, tmp_path / "run")
    in_process_run(overrides, tmp_path / "run", observer=tracker).fit().finish()
    results = load_results(tmp_path / "run")
    assert results.run.status == "completed" and len(results.rounds) == 2
    assert results.final.model_file == "model.pt" and (tmp_path / "run" / "model.pt").stat().st_size
    error = results.run.tracking.error
    assert error is not None and "mlflow.db" in error, error
    assert results.run.tracking.run_id is None
    warnings = [r for r in caplog.records if "MLflow tracking failed" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


def test_a_tracked_run_turns_mlflows_usage_telemetry_off_unless_the_environment_says(tmp_path, monkeypatch):
    """README: no usage data goes to MLflow's servers. MLflow's own check (its telemetry
    client asks it before sending anything) says disabled once the ServerApp starts tracking;
    its CI/testing switch is turned off here so only our setting can make it true."""
    import mlflow.telemetry.utils as telemetry

    monkeypatch.setattr(telemetry, "_IS_IN_CI_ENV_OR_TESTING", False)
    monkeypatch.delenv("DO_NOT_TRACK", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "")  # records the variable's state ...
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY")  # ... so the test leaves it as it was
    assert not telemetry.is_telemetry_disabled()  # MLflow's default: telemetry on
    cfg = load_config(f"tracking.enabled=true tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    start_tracking(cfg, tmp_path, tmp_path / "run").close()
    assert telemetry.is_telemetry_disabled()
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")  # an explicit choice is kept
    start_tracking(cfg, tmp_path, tmp_path / "run2").close()
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"


@pytest.mark.integration
def test_a_tracking_server_that_is_down_costs_seconds_and_is_recorded(tmp_path):
    # port 9 (discard) on loopback: nothing listens, connections are refused
    cfg = load_config("tracking.enabled=true tracking.uri=http://127.0.0.1:9")
    tracker = start_tracking(cfg, tmp_path, tmp_path / "run")
    from core.results import FinalRecord, RunRecorder

    started = time.perf_counter()
    recorder = RunRecorder(tmp_path / "run", cfg, token="t", observer=tracker)
    recorder.set_initial({"loss": 2.3, "accuracy": 0.1})
    recorder.finish(FinalRecord(rounds_completed=0), None)
    assert time.perf_counter() - started < 30  # MLflow's default retries take minutes
    results = load_results(tmp_path / "run")
    assert results.run.status == "completed"
    assert "127.0.0.1" in results.run.tracking.error or "onnect" in results.run.tracking.error


def test_tracking_off_writes_no_tracking_section(tmp_path):
    cfg = load_config("tracking.enabled=false")
    assert start_tracking(cfg, tmp_path, tmp_path / "run") is None
    from core.results import RunRecorder

    RunRecorder(tmp_path / "run", cfg).fail("x")
    assert "tracking" not in json.loads((tmp_path / "run" / "results.json").read_text())["run"]


def test_tracking_is_on_unless_the_environment_turns_it_off(monkeypatch):
    def enabled():
        return OmegaConf.to_object(OmegaConf.structured(TrackingConfig)).enabled

    monkeypatch.delenv(TRACKING_ENV, raising=False)
    assert enabled() is True
    monkeypatch.setenv(TRACKING_ENV, "false")  # what the test suite sets (tests/conftest.py)
    assert enabled() is False


def test_the_default_store_is_sqlite_under_the_runs_root_unless_set(tmp_path, monkeypatch):
    cfg = load_config()
    assert cfg.tracking.uri is None
    assert tracking_uri(cfg, tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking_uri(cfg, tmp_path) == "http://mlflow.example:5000"
    cfg = load_config("tracking.uri=sqlite:////srv/mlflow.db")
    assert tracking_uri(cfg, tmp_path) == "sqlite:////srv/mlflow.db"


def test_params_are_the_flattened_config_cut_at_mlflows_limit():
    cfg = load_config("model=mlp model.hidden_sizes=[64,32] tracking.enabled=true")
    params = config_params(cfg)
    assert params["model.hidden_sizes"] == "[64, 32]" and params["output_dir"] == "null"
    assert params["tracking.enabled"] == "true" and params["privacy.name"] == "none"
    cfg.output_dir = "/" + "x" * 7000
    value = config_params(cfg)["output_dir"]
    assert len(value) == 6000 and value.endswith("characters: config.yaml has them all)")


def test_a_sweep_passes_its_directory_to_each_job(tmp_path):
    cmd = flwr_run_command(load_config(), ["seed=1"], token="t", sweep_dir="/runs/sweep 1")
    assert cmd[-2:] == ["--run-config", 'sweep-dir="/runs/sweep 1"']


@pytest.mark.parametrize(
    "override, message",
    [
        ("tracking.url=http://x", "'tracking.url' is not a key"),
        ("tracking.uri=mlruns", "must be an MLflow tracking URI with its scheme"),
        ("tracking.uri=sqlite:///mlflow.db", "absolute path, sqlite:////abs/path/mlflow.db"),
        ("tracking.experiment=''", "must name an MLflow experiment"),
    ],
)
def test_tracking_keys_are_checked_at_config_time(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(override)



def test_a_resume_may_track_elsewhere_and_a_checkpoint_from_before_tracking_resumes(tmp_path):
    from app.checkpoint import Checkpoint, check_resumable

    first = load_config(f"output_dir={tmp_path} num_rounds=2")
    cfg = load_config(f"output_dir={tmp_path} resume=true tracking.uri=http://mlflow:5000")
    before = OmegaConf.to_container(OmegaConf.create(resolved_yaml(first)))
    before.pop("tracking")  # a checkpoint written before the tracking section existed
    for saved in (resolved_yaml(first), OmegaConf.to_yaml(before)):
        check_resumable(Checkpoint(2, [], {}, {}, saved), cfg, resolved_yaml(cfg))


def test_a_resumed_run_is_a_new_mlflow_run_and_the_killed_one_is_marked_killed(store, tmp_path):
    """Round 1, a crash (the MLflow run left RUNNING), resume=true: the resumed run is a new
    MLflow run tagged `resumed_from` with every round (the checkpoint's logged again), and the
    earlier run is KILLED, tagged `resumed_by` it."""
    from app.checkpoint import load, save
    from app.tracking import resumed_tracking_id

    uri, client = store
    out = tmp_path / "run"
    overrides = (
        f"model=linear num_rounds=3 strategy.fraction_train=1.0 "
        f"tracking.enabled=true tracking.uri={uri} tracking.experiment={EXPERIMENT}"
    )
    cfg = load_config(overrides)
    holder = {}

    def checkpoint(server_round, arrays, state):
        save(out, server_round, arrays, state, holder["run"].recorder.results, resolved_yaml(cfg))

    tracker = start_tracking(cfg, tmp_path, out, token="t1")
    holder["run"] = in_process_run(overrides, out, seed=0, checkpoint_fn=checkpoint, observer=tracker)
    holder["run"].fit(num_rounds=1)
    tracker.close()  # the ServerApp killed here: no finish, its MLflow run stays RUNNING
    ckpt = load(out)
    first_id = resumed_tracking_id(ckpt.results)
    assert first_id and client.get_run(first_id).info.status == "RUNNING"

    again = start_tracking(cfg, tmp_path, out, token="t2", resumed_from=first_id)
    in_process_run(overrides, out, seed=0, observer=again, resume=ckpt, token="t2").fit().finish()
    second_id = load_results(out).run.tracking.run_id
    first, second = client.get_run(first_id), client.get_run(second_id)
    assert second_id != first_id and second.info.status == "FINISHED"
    assert first.info.status == "KILLED" and first.data.tags["resumed_by"] == second_id
    assert second.data.tags["resumed_from"] == first_id and second.data.tags["resumed_after_round"] == "1"
    steps = [m.step for m in client.get_metric_history(second_id, "seconds")]
    assert sorted(steps) == [1, 2, 3]


def test_a_resume_whose_earlier_mlflow_run_was_deleted_is_tracked_all_the_same(store, tmp_path):
    uri, client = store
    cfg = load_config(f"model=linear num_rounds=1 tracking.enabled=true tracking.uri={uri} tracking.experiment={EXPERIMENT}")
    # artifacts under tmp_path: MLflow's default location is ./mlruns in the test's working directory
    experiment = client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    earlier = client.create_run(experiment).info.run_id
    client.delete_run(earlier)
    tracker = start_tracking(cfg, tmp_path, tmp_path / "run", token="t", resumed_from=earlier)
    in_process_run(f"model=linear num_rounds=1 tracking.enabled=true tracking.uri={uri} tracking.experiment={EXPERIMENT}",
                   tmp_path / "run", observer=tracker).fit().finish()  # fmt: skip
    info = load_results(tmp_path / "run").run.tracking
    assert info.error is None and client.get_run(info.run_id).info.status == "FINISHED"
    assert client.get_run(info.run_id).data.tags["resumed_from"] == earlier
