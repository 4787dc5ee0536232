"""Deployment across machines: credentials, site data, and a real SuperLink + 3 SuperNodes on
loopback with TLS and node authentication, driven by the README's own commands.

The slow tests run the commands of README "Deploy across machines" exactly as written (parsed
from the README, with the variables set to loopback values), in an isolated Flower home; the
fixture stops every process it started (SuperLink, SuperExecs, SuperNodes, ServerApp and
ClientApp processes, found by the FLWR_HOME they inherit), also when a test fails.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import ssl
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key
from hypothesis import given, settings
from hypothesis import strategies as st

from app import deploy
from app.config import load_config
from core.data import load_client_data, load_file_data
from core.result_types import FailureRecord
from protections.he.context import load_context
from tests.support.flower import PROJECT_DIR
from tests.support.processes import free_port as _free_port
from tests.support.processes import processes_with_env, stop_processes

# One xdist worker runs this whole file: its module-scoped fixture is built once.
pytestmark = pytest.mark.xdist_group("deploy")

README_STEPS = ("credentials", "data", "superlink", "connection", "register", "supernode", "run",
                "run-he", "decrypt")


def readme_commands() -> dict[str, str]:
    """{step: command} from the README's `<!-- deploy:STEP -->` bash blocks."""
    text = (PROJECT_DIR / "README.md").read_text()
    blocks = re.findall(r"<!-- deploy:([\w-]+) -->\n```bash\n(.*?)```", text, re.S)
    return {name: body.strip() for name, body in blocks}


# --------------------------------------------------------------------------- fast tests
def test_readme_deploy_section_has_every_step_once():
    text = (PROJECT_DIR / "README.md").read_text()
    assert sorted(readme_commands()) == sorted(README_STEPS)
    assert len(re.findall(r"<!-- deploy:", text)) == len(README_STEPS)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_credentials_verify_load_in_flower_and_keep_secrets_private(tmp_path):
    out = tmp_path / "creds"
    rc = deploy.main(["credentials", "--out", str(out), "--supernodes", "2",
                      "--hosts", "superlink.example.org,10.0.0.5", "--he"])  # fmt: skip
    assert rc == 0
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "superlink/server.crt").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "127.0.0.1"]
    key = load_pem_private_key((out / "superlink/server.key").read_bytes(), None)
    assert key.public_key() == server.public_key()

    # A real TLS handshake: a client trusting only our CA accepts the SuperLink's certificate
    # for a name in its SANs and refuses it for any other name.
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(out / "superlink/server.crt", out / "superlink/server.key")
    client_ctx = ssl.create_default_context(cafile=out / "ca.crt")
    assert _handshake(server_ctx, client_ctx, "superlink.example.org")
    assert not _handshake(server_ctx, client_ctx, "other.example.org")

    # Node-auth keys in the formats Flower reads: its own loaders accept them.
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    pubs = set()
    for i in range(2):
        node = out / f"supernode-{i}"
        private = load_ssh_private_key((node / "auth.key").read_bytes(), None)
        assert isinstance(private.curve, ec.SECP384R1)
        registered = try_load_public_key(node / "auth.pub")  # what `flwr supernode register` sends
        assert registered == public_key_to_bytes(private.public_key())
        pubs.add(registered)
    assert len(pubs) == 2  # one key pair per SuperNode

    secret, public = load_context(out / "he/secret.ctx"), load_context(out / "he/public.ctx")
    assert secret.is_secret and not public.is_secret
    assert secret.fingerprint == public.fingerprint
    for private_file in ("ca.key", "superlink/server.key", "supernode-0/auth.key",
                         "supernode-1/auth.key", "he/secret.ctx"):  # fmt: skip
        assert _mode(out / private_file) == 0o600, private_file
    for public_file in ("ca.crt", "superlink/server.crt", "supernode-0/auth.pub", "he/public.ctx"):
        assert _mode(out / public_file) == 0o644, public_file


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str) -> bool:
    import socket
    import threading

    a, b = socket.socketpair()
    errors = []

    def serve():
        try:
            server_ctx.wrap_socket(a, server_side=True).close()
        except (ssl.SSLError, OSError) as err:
            errors.append(err)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        client_ctx.wrap_socket(b, server_hostname=hostname).close()
        ok = True
    except ssl.SSLCertVerificationError:
        ok = False
    finally:
        b.close()
        thread.join(5)
        a.close()
    return ok


def test_credentials_reject_bad_arguments(tmp_path, capsys):
    assert deploy.main(["credentials", "--out", str(tmp_path), "--supernodes", "0"]) == 2
    assert "at least one SuperNode" in capsys.readouterr().err
    assert deploy.main(["credentials", "--out", str(tmp_path), "--supernodes", "1",
                        "secagg.scale_bits=20"]) == 2  # fmt: skip
    assert "add --he" in capsys.readouterr().err
    assert deploy.main(["credentials", "--out", str(tmp_path), "--supernodes", "1",
                        "--he", "secagg.poly_modulus_degree=1000"]) == 2  # fmt: skip
    assert "secagg.poly_modulus_degree=1000: use a power of two >= 1024" in capsys.readouterr().err
    assert not (tmp_path / "ca.key").exists()  # nothing written before the config is valid


def test_exported_site_files_hold_exactly_the_simulated_partitions(tmp_path):
    assert deploy.main(["export-data", "--out", str(tmp_path), "--supernodes", "3"]) == 0
    cfg = load_config()
    total = 0
    for i in range(3):
        with np.load(tmp_path / f"site-{i}.npz") as site:
            x, y = site["x"], site["y"]
        train, val = load_client_data(cfg.dataset, cfg.partitioner, i, 3, cfg.seed)
        expected = np.concatenate([np.concatenate([train.x, val.x]),
                                   np.concatenate([train.y, val.y])[:, None]], axis=1)  # fmt: skip
        got = np.concatenate([x, y[:, None]], axis=1)
        # the same rows (the order differs: simulation splits off validation first)
        np.testing.assert_array_equal(np.unique(got, axis=0), np.unique(expected, axis=0))
        assert len(got) == len(expected)
        total += len(y)
    assert total == 1437  # 1797 digits minus the server's 20% test split (360)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), val_fraction=st.sampled_from([0.0, 0.1, 0.25, 0.5]),
       seed=st.integers(0, 2**31))  # fmt: skip
def test_file_data_split_keeps_every_row_once(tmp_path_factory, n, val_fraction, seed):
    path = tmp_path_factory.mktemp("site") / "site.npz"
    rng = np.random.default_rng(seed)
    x = rng.random((n, 64)).astype(np.float32)
    x[:, 0] = np.arange(n)  # identifies each row
    y = rng.integers(0, 10, n)
    np.savez(path, x=x, y=y)
    cfg = load_config([f"dataset.val_fraction={val_fraction}"]).dataset
    train, val = load_file_data(path, cfg, seed)
    ids = np.concatenate([train.x[:, 0], val.x[:, 0]]).astype(int)
    assert sorted(ids) == list(range(n))
    expected_val = 0 if val_fraction == 0 else min(math.ceil(val_fraction * n), n - 1)
    assert len(val) == expected_val and len(train) == n - expected_val >= 1
    np.testing.assert_array_equal(train.y, y[train.x[:, 0].astype(int)])
    assert train.y.dtype == np.int64 and train.x.dtype == np.float32


def test_csv_site_file_and_bad_files_say_what_is_wrong(tmp_path):
    cfg = load_config(["dataset=breast_cancer"]).dataset
    rows = np.random.default_rng(0).normal(size=(40, 30))
    labels = np.arange(40) % 2
    csv = tmp_path / "site.csv"
    header = ",".join([f"f{i}" for i in range(30)] + ["label"])
    np.savetxt(csv, np.column_stack([rows, labels]), delimiter=",", header=header, comments="")
    train, val = load_file_data(csv, cfg, 0)
    assert len(train) + len(val) == 40 and len(val) == 4  # ceil(0.1 * 40)
    assert set(np.concatenate([train.y, val.y])) == {0, 1}

    with pytest.raises(ValueError, match=r"\(n, 30\) features"):
        np.savez(tmp_path / "narrow.npz", x=rows[:, :5], y=labels)
        load_file_data(tmp_path / "narrow.npz", cfg, 0)
    with pytest.raises(ValueError, match=r"labels must be integers in 0\.\.1"):
        np.savez(tmp_path / "labels.npz", x=rows, y=labels + 5)
        load_file_data(tmp_path / "labels.npz", cfg, 0)
    with pytest.raises(ValueError, match="lacks the arrays"):
        np.savez(tmp_path / "nolabels.npz", x=rows)
        load_file_data(tmp_path / "nolabels.npz", cfg, 0)
    with pytest.raises(ValueError, match="is not a file: check the SuperNode's --node-config"):
        load_file_data(tmp_path / "missing.npz", cfg, 0)
    with pytest.raises(ValueError, match=r"use a \.npz"):
        (tmp_path / "site.parquet").write_bytes(b"")
        load_file_data(tmp_path / "site.parquet", cfg, 0)


def test_a_failed_client_call_is_recorded_with_its_node_and_reason():
    """Flower's fit_clients keeps only the exception of a failed call; the tracking proxies
    make it name the node. The transport here raises what GridClientProxy raises when the
    SuperLink answers for a lost node."""
    from flwr.common import Code, FitIns, FitRes, Parameters, Status
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.server import fit_clients

    from app.experiment_server import NodeTrackingClientManager, describe_failures

    lost = ("Message contains an Error (reason: Error: Node Unavailable — The destination node "
            "failed to report a heartbeat within 2 × its expected interval.).")  # fmt: skip

    class Transport(ClientProxy):
        def fit(self, ins, timeout, group_id):
            if self.cid == "7":
                raise ValueError(lost)
            code = Code.FIT_NOT_IMPLEMENTED if self.cid == "8" else Code.OK
            return FitRes(Status(code, f"status of {self.cid}"), ins.parameters, 10, {})

        get_properties = get_parameters = evaluate = reconnect = None

    manager = NodeTrackingClientManager()
    for cid in ("6", "7", "8"):
        assert manager.register(Transport(cid))
    ins = FitIns(Parameters([], ""), {})
    results, failures = fit_clients(
        [(proxy, ins) for proxy in manager.all().values()], None, None, group_id=1
    )
    assert [proxy.cid for proxy, _ in results] == ["6"]
    assert sorted(describe_failures(failures, "train"), key=lambda f: f.node_id) == [
        FailureRecord(node_id="7", stage="train", reason=lost),
        FailureRecord(node_id="8", stage="train", reason="status of 8"),
    ]


# --------------------------------------------------------------------------- deployment
class Deployment:
    """The README's deployment: one FLWR_HOME, free ports, a log per process. On loopback by
    default; `prefixes` runs a role ("superlink", "workstation", "site-<i>") inside a network
    namespace (`ip netns exec <ns>`)."""

    def __init__(self, root: Path, host: str = "127.0.0.1", prefixes: dict | None = None) -> None:
        self.root = root
        self.home = root / "flwr_home"
        self.home.mkdir()
        self.commands = readme_commands()
        self.prefixes = prefixes or {}
        self.env = dict(os.environ)
        self.env.pop("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", None)  # only the README's command sets it
        self.env.update(
            FLWR_HOME=str(self.home),
            FLWR_DISABLE_UPDATE_CHECK="1",
            SUPERLINK_HOST=host,
            SUPERLINK_PORT=str(_free_port()),
            DEPLOY_DIR=str(root / "deploy"),
        )
        self.processes: dict[str, subprocess.Popen] = {}
        self.node_ids: dict[int, str] = {}

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def argv(self, role: str, command: str) -> list[str]:
        return [*self.prefixes.get(role, []), "bash", "-c", command]

    def run(self, step: str, timeout: float = 120, role: str = "workstation", **env):
        return self.shell(self.commands[step], timeout, role, **env)

    def shell(self, command: str, timeout: float = 120, role: str = "workstation", **env):
        return subprocess.run(
            self.argv(role, command), cwd=PROJECT_DIR, env={**self.env, **env},
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def start(self, name: str, command: str, role: str = "workstation", **env) -> subprocess.Popen:
        """A long-running process in its own session (killable as a group), output to a log."""
        with self.log(name).open("w") as log:
            proc = subprocess.Popen(
                self.argv(role, f"exec {command}"), cwd=PROJECT_DIR, env={**self.env, **env},
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.processes[name] = proc
        return proc

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.shell(" ".join(["flwr", *args]), timeout)

    def nodes(self) -> list[dict]:
        proc = self.flwr("supernode", "list", "hospitals", "--format", "json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads(proc.stdout[proc.stdout.index("{"):])["nodes"]

    def start_all(self, sites: int = 3) -> None:
        """README steps 1-5: credentials, data, SuperLink, connection, registration, SuperNodes."""
        for step in ("credentials", "data", "connection"):
            proc = self.run(step)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        superlink = self.start("superlink", self.commands["superlink"], role="superlink")
        answers = lambda: self.flwr("supernode", "list", "hospitals").returncode == 0  # noqa: E731
        _wait("the SuperLink answering over TLS", answers, 60, superlink, self.log("superlink"))
        proc = self.run("register")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.count("registered successfully") == sites
        for site in range(sites):
            self.start(f"supernode-{site}", self.commands["supernode"], role=f"site-{site}",
                       SITE=str(site), SUPERNODE_PORT=str(_free_port()))  # fmt: skip
        for site in range(sites):
            log = self.log(f"supernode-{site}")
            _wait(f"SuperNode {site} connected", lambda: "SuperNode ID:" in log.read_text(), 60,
                  self.processes[f"supernode-{site}"], log)  # fmt: skip
            self.node_ids[site] = re.search(r"SuperNode ID: (\d+)", log.read_text()).group(1)
            # the README's command sets the SuperExec's task poll (the SuperNode's own process)
            environ = Path(f"/proc/{self.processes[f'supernode-{site}'].pid}/environ").read_bytes()
            assert b"FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1" in environ.split(b"\0")
        nodes = self.nodes()
        assert sorted(n["node-id"] for n in nodes) == sorted(self.node_ids.values())
        assert {n["status"] for n in nodes} == {"online"}

    def stop(self) -> None:
        stop_processes(processes_with_env("FLWR_HOME", str(self.home)))
        assert not processes_with_env("FLWR_HOME", str(self.home)), "processes left running"


def _wait(what: str, condition, timeout: float, proc: subprocess.Popen | None = None, log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"{what} did not happen within {timeout} s\n{tail}")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    dep = Deployment(tmp_path_factory.mktemp("deployment"))
    try:
        dep.start_all()
        yield dep
    finally:
        dep.stop()


def _supernode_command(dep: Deployment, *extra: str) -> str:
    return (f"flower-supernode --superlink 127.0.0.1:{dep.env['SUPERLINK_PORT']} "
            f"--port {_free_port()} "
            f"--max-retries 2 --max-wait-time 20 --node-config 'partition-id=0 num-partitions=3' "
            + " ".join(extra))  # fmt: skip


@pytest.mark.e2e
def test_supernode_with_an_unregistered_key_is_refused(deployment, tmp_path):
    private, _ = deploy.make_node_auth_keys()
    key = tmp_path / "stranger.key"
    key.write_bytes(private)
    key.chmod(0o600)
    ca = Path(deployment.env["DEPLOY_DIR"]) / "creds" / "ca.crt"
    proc = deployment.start("stranger", _supernode_command(deployment, f"--root-certificates {ca}",
                                                           f"--auth-supernode-private-key {key}"))
    assert proc.wait(timeout=90) != 0
    log = deployment.log("stranger").read_text()
    assert "Failed to activate SuperNode" in log and "SuperNode ID:" not in log
    assert len(deployment.nodes()) == 3


@pytest.mark.e2e
def test_supernode_without_tls_or_trusting_another_ca_cannot_connect(deployment, tmp_path):
    import httpx

    # plaintext HTTP to the SuperLink's port gets no HTTP answer at all
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{deployment.env['SUPERLINK_PORT']}/health", timeout=5)
    # a SuperNode dialling without TLS (it cannot then authenticate either)
    plain = deployment.start("plaintext", _supernode_command(deployment, "--insecure"))
    assert plain.wait(timeout=90) != 0
    log = deployment.log("plaintext").read_text()
    assert "Failed to initialize the connection to the SuperLink" in log
    assert "SuperNode ID:" not in log
    # a SuperNode trusting another CA refuses the SuperLink's certificate (no silent fallback)
    deploy.main(["credentials", "--out", str(tmp_path / "other"), "--supernodes", "1"])
    key = Path(deployment.env["DEPLOY_DIR"]) / "creds" / "supernode-0" / "auth.key"
    other = deployment.start("other-ca", _supernode_command(
        deployment, f"--root-certificates {tmp_path / 'other' / 'ca.crt'}",
        f"--auth-supernode-private-key {key}"))  # fmt: skip
    assert other.wait(timeout=90) != 0
    log = deployment.log("other-ca").read_text()
    assert "CERTIFICATE_VERIFY_FAILED" in log and "SuperNode ID:" not in log
    assert len(deployment.nodes()) == 3 and {n["status"] for n in deployment.nodes()} == {"online"}


def _results(dep: Deployment, name: str) -> tuple[Path, dict]:
    out = Path(dep.env["DEPLOY_DIR"]) / "runs" / name
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.e2e
def test_deployed_he_and_dp_run_completes_without_a_secret_key_on_the_server(deployment):
    proc = deployment.run("run-he", timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out, results = _results(deployment, "he-dp")
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    for r in results["rounds"]:
        assert r["clients"] == {"trained": 2, "failed": 0}  # fraction_train 0.5 of 3 nodes
        assert r["secagg"]["clients_aggregated"] == 2
        # under privacy= no metric computed on the sites' data leaves them (no federated
        # evaluation): the key holder's decrypted model below is what shows it learned
        assert "federated" not in r and "train" not in r
    eps = [r["privacy"]["epsilon"] for r in results["rounds"]]
    assert 0 < eps[0] < eps[1]
    assert results["final"]["num_supernodes"] == 3
    assert "centralized" not in results["rounds"][0]  # the server cannot read the model
    assert not (out / "keys").exists()  # deployment: no keys provisioned on the server side
    assert not (out / "model.pt").exists()  # the server saved only the encrypted model
    assert not (deployment.home / "runtime-envs").exists()

    # the key holder's README command decrypts it into a model that classifies the test split
    proc = deployment.run("decrypt")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import torch

    from core.data import centralized_test_split, data_spec
    from core.evaluation import evaluate
    from core.models import build_model

    cfg = load_config("secagg=he privacy=client_fixed")
    model = build_model(cfg.model, data_spec(cfg.dataset))
    model.load_state_dict(torch.load(out / "model.pt"))
    test = centralized_test_split(cfg.dataset, cfg.seed)
    assert evaluate(model, test, "classification", torch.device("cpu"))["accuracy"] >= 0.25


@pytest.mark.e2e
def test_a_superlink_restarted_mid_run_is_resumed_from_the_checkpoint(deployment):
    """The SuperLink's machine goes down once round 1's checkpoint is written (SuperLink,
    SuperExec and ServerApp killed together); it comes back with the same command and
    database, the SuperNodes reconnect by themselves, and the run's own overrides plus
    `resume=true` finish it: round 1 as the first attempt recorded it, round 2 resumed."""
    from app.checkpoint import CHECKPOINT_DIR, STATE_FILE

    out = Path(deployment.env["DEPLOY_DIR"]) / "runs" / "restart"
    overrides = f"num_rounds=2 strategy.fraction_evaluate=0 output_dir={out}"
    run_command = f'flwr run . hospitals --stream --run-config "overrides=\\"{overrides}\\""'
    with deployment.log("run-restart").open("w") as log:
        first = subprocess.Popen(["bash", "-c", run_command], cwd=PROJECT_DIR, env=deployment.env,
                                 stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    deployment.processes["run-restart"] = first
    state = out / CHECKPOINT_DIR / STATE_FILE
    _wait("round 1's checkpoint", state.exists, 300, first, deployment.log("run-restart"))
    os.killpg(deployment.processes["superlink"].pid, signal.SIGKILL)
    deployment.processes["superlink"].wait(timeout=30)
    try:  # the workstation's `flwr run --stream` loses its SuperLink
        first.wait(timeout=60)
    except subprocess.TimeoutExpired:  # still retrying: the user presses Ctrl-C
        first.kill()
        first.wait()
    assert json.loads(state.read_text())["round"] == 1
    assert not (out / "model.pt").exists()

    superlink = deployment.start("superlink", deployment.commands["superlink"], role="superlink")
    online = lambda: sum(n["status"] == "online" for n in deployment.nodes()) == 3  # noqa: E731
    _wait("the SuperLink answering again", lambda: deployment.flwr("supernode", "list", "hospitals").returncode == 0,
          60, superlink, deployment.log("superlink"))  # fmt: skip
    _wait("the three SuperNodes back online", online, 120, superlink, deployment.log("superlink"))

    proc = deployment.shell(run_command.replace(f"output_dir={out}", f"output_dir={out} resume=true"), 400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, results = _results(deployment, "restart")
    assert results["run"]["status"] == "completed" and results["run"]["resumed_after_round"] == 1
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert all(r["clients"] == {"trained": 2, "failed": 0} for r in results["rounds"])
    assert results["final"]["rounds_completed"] == 2 and (out / "model.pt").exists()
    assert results["final"]["centralized"]["accuracy"] >= 0.8


@pytest.mark.e2e
def test_a_supernode_killed_mid_run_is_reported_and_the_run_completes(deployment):
    logs = {site: deployment.log(f"supernode-{site}") for site in range(3)}
    offsets = {site: logs[site].stat().st_size for site in logs}
    with deployment.log("run").open("w") as log:
        run = subprocess.Popen(["bash", "-c", deployment.commands["run"]], cwd=PROJECT_DIR,
                               env=deployment.env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    deployment.processes["run"] = run

    def receiving_round_2_train() -> int | None:
        for site, path in logs.items():
            new = path.read_text()[offsets[site]:]
            if re.search(r"ROUND 2\]\n.*Receiving: train", new):
                return site
        return None

    _wait("a SuperNode receiving round 2's training", lambda: receiving_round_2_train() is not None,
          300, run, deployment.log("run"))  # fmt: skip
    victim = receiving_round_2_train()
    # The whole machine goes: SuperNode, its SuperExec and the ClientApp it started.
    os.killpg(deployment.processes[f"supernode-{victim}"].pid, signal.SIGKILL)
    assert run.wait(timeout=300) == 0, deployment.log("run").read_text()[-3000:]

    _, results = _results(deployment, "fedavg")
    first, second = results["rounds"]
    assert first["clients"] == {"trained": 2, "failed": 0}
    assert second["clients"]["trained"] == 1 and second["clients"]["failed"] == 1
    lost = [f for f in second["clients"]["failures"] if f["stage"] == "train"]
    assert lost[0]["node_id"] == deployment.node_ids[victim]
    assert "Node Unavailable" in lost[0]["reason"]
    assert all(f["node_id"] == deployment.node_ids[victim] for f in second["clients"]["failures"])
    final = results["final"]
    assert final["rounds_completed"] == 2 and final["rounds_with_failures"] == [2]
    assert final["centralized"]["accuracy"] >= 0.85
    assert [n["status"] for n in deployment.nodes()].count("online") == 2


# --------------------------------------------------------------------------- network namespaces
NETNS_SUBNET = "10.77.0"  # exists only inside the test's own namespaces


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _netns_unavailable() -> str | None:
    """Why this machine cannot build network namespaces (None: it can)."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) on this machine"
    probe = f"fpf-probe-{os.getpid()}"
    made = _ip("netns", "add", probe)
    _ip("netns", "del", probe)
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    return None


@pytest.mark.e2e
def test_deployment_across_network_namespaces(tmp_path):
    """The SuperLink, each SuperNode and the workstation in their own network namespace with
    their own address (a bridge in the SuperLink's namespace, a veth pair per peer); nothing
    is configured in the machine's own namespace. Every node must train in the round."""
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    prefix = f"fpf{os.getpid()}"
    roles = ["superlink", "workstation", "site-0", "site-1", "site-2"]
    names = {role: f"{prefix}-{i}" for i, role in enumerate(roles)}
    dep = Deployment(tmp_path, host=f"{NETNS_SUBNET}.1",
                     prefixes={r: ["ip", "netns", "exec", ns] for r, ns in names.items()})  # fmt: skip
    try:
        hub = names["superlink"]
        for ns in names.values():
            assert _ip("netns", "add", ns).returncode == 0
            assert _ip("-n", ns, "link", "set", "lo", "up").returncode == 0
        steps = [("-n", hub, "link", "add", "br0", "type", "bridge"),
                 ("-n", hub, "addr", "add", f"{NETNS_SUBNET}.1/24", "dev", "br0"),
                 ("-n", hub, "link", "set", "br0", "up")]  # fmt: skip
        for k, role in enumerate(roles[1:], start=2):
            ns = names[role]
            steps += [("-n", hub, "link", "add", f"v{k}", "type", "veth", "peer", "name", "eth0", "netns", ns),
                      ("-n", hub, "link", "set", f"v{k}", "master", "br0", "up"),
                      ("-n", ns, "addr", "add", f"{NETNS_SUBNET}.{k}/24", "dev", "eth0"),
                      ("-n", ns, "link", "set", "eth0", "up")]  # fmt: skip
        for step in steps:
            made = _ip(*step)
            assert made.returncode == 0, f"ip {' '.join(step)}: {made.stderr}"
        dep.start_all()
        # separate stacks: from the workstation's namespace the SuperLink's port answers on
        # the SuperLink's address only, not on loopback
        probe = "import socket, sys; socket.create_connection((sys.argv[1], {}), timeout=3)".format(
            dep.env["SUPERLINK_PORT"])  # fmt: skip
        assert dep.shell(f'python -c "{probe}" {NETNS_SUBNET}.1').returncode == 0
        assert dep.shell(f'python -c "{probe}" 127.0.0.1').returncode != 0
        out = Path(dep.env["DEPLOY_DIR"]) / "runs" / "netns"
        proc = dep.shell(
            "flwr run . hospitals --stream --run-config "
            f"'overrides=\"num_rounds=1 strategy.fraction_train=1.0 strategy.fraction_evaluate=0 output_dir={out}\"'",
            timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results = json.loads((out / "results.json").read_text())
        assert results["rounds"][0]["clients"] == {"trained": 3, "failed": 0}
        assert results["final"]["num_supernodes"] == 3
        assert results["final"]["centralized"]["accuracy"] >= 0.7
    finally:
        try:
            dep.stop()
        finally:
            for ns in names.values():
                _ip("netns", "del", ns)  # removes its veth ends and bridge with it
    assert not any(ns in _ip("netns", "list").stdout for ns in names.values())
