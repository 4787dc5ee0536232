"""One round deployed vs the same round simulated, side by side.

    python -m benchmarks.deployment_round [--rounds 3] [--supernodes 3] [--overrides "..."]

Runs the same experiment twice, in one go, each in its own Flower home with free ports:
- simulation: `flwr run .` on Flower's simulation engine with N SuperNodes (1 CPU each);
- deployment: a SuperLink with TLS and node authentication and N SuperNodes on loopback,
  started as README "Deploy across machines" does (the SuperNodes with `partition-id=i
  num-partitions=N`, so both runs train on identical data), then `flwr run . bench`.
Prints each round's wall seconds from the two `results.json` (train + centralized and
federated evaluation), their ratio, the means over rounds 2.. (round 1 carries the
simulation's Ray start-up), the final accuracies, and the cold start of one ClientApp process
(`python -c "import app.client_app"`): a deployed SuperNode starts one for every message,
where the simulation keeps its Ray workers warm. Every process started is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.processes import free_port, isolated_flower_env, stop_flower

ROOT = Path(__file__).resolve().parents[1]


def base_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, **isolated_flower_env(home)}


def flwr_run(env: dict, target: list[str], overrides: str) -> None:
    cmd = ["flwr", "run", str(ROOT), *target, "--stream", "--run-config", f'overrides="{overrides}"']
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def simulate(work: Path, n: int, overrides: str) -> dict:
    home = work / "sim_home"
    env = base_env(home)
    try:
        flwr_run(env, ["--federation-config", f"num-supernodes={n} client-resources-num-cpus=1"],
                 f"{overrides} output_dir={work / 'sim'}")  # fmt: skip
    finally:
        stop_flower(home)
    return json.loads((work / "sim" / "results.json").read_text())


def deploy(work: Path, n: int, overrides: str) -> dict:
    from app.deploy import write_credentials

    home = work / "dep_home"
    env = base_env(home)
    creds = work / "creds"
    write_credentials(creds, n, ["127.0.0.1"])
    port = free_port()
    logs = []

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        log = (work / f"{name}.log").open("w")
        logs.append(log)
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    try:
        start("superlink", [
            "flower-superlink", "--ssl-ca-certfile", str(creds / "ca.crt"),
            "--ssl-certfile", str(creds / "superlink/server.crt"),
            "--ssl-keyfile", str(creds / "superlink/server.key"), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
        ])  # fmt: skip
        subprocess.run(["flwr", "config", "list"], env=env, capture_output=True, check=True)
        with (home / "config.toml").open("a") as f:
            f.write(f'\n[superlink.bench]\naddress = "127.0.0.1:{port}"\n'
                    f'root-certificates = "{creds / "ca.crt"}"\n')  # fmt: skip
        for i in range(n):
            for _ in range(60):  # until the SuperLink answers
                reg = subprocess.run(
                    ["flwr", "supernode", "register", str(creds / f"supernode-{i}/auth.pub"), "bench"],
                    env=env, capture_output=True, text=True,
                )  # fmt: skip
                if reg.returncode == 0:
                    break
                time.sleep(1)
            else:
                raise RuntimeError(f"cannot register SuperNode {i}: {reg.stdout}{reg.stderr}")
            start(f"supernode-{i}", [
                "flower-supernode", "--superlink", f"127.0.0.1:{port}",
                "--root-certificates", str(creds / "ca.crt"),
                "--auth-supernode-private-key", str(creds / f"supernode-{i}/auth.key"),
                "--port", str(free_port()), "--node-config", f"partition-id={i} num-partitions={n}",
            ])  # fmt: skip
        for i in range(n):
            for _ in range(120):
                if "SuperNode ID:" in (work / f"supernode-{i}.log").read_text():
                    break
                time.sleep(0.5)
            else:
                raise RuntimeError(f"SuperNode {i} did not connect; see {work}/supernode-{i}.log")
        flwr_run(env, ["bench"], f"{overrides} output_dir={work / 'dep'}")
    finally:
        stop_flower(home)
        for log in logs:
            log.close()
    return json.loads((work / "dep" / "results.json").read_text())


def cold_start_seconds() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import app.client_app"], cwd=ROOT, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--supernodes", type=int, default=3)
    parser.add_argument("--overrides", default="", help="Hydra overrides for both runs")
    args = parser.parse_args()
    overrides = f"num_rounds={args.rounds} {args.overrides}".strip()
    with tempfile.TemporaryDirectory(prefix="deploy-bench-") as tmp:
        work = Path(tmp)
        sim = simulate(work, args.supernodes, overrides)
        dep = deploy(work, args.supernodes, overrides)
        cold = cold_start_seconds()
    print(f"{args.supernodes} SuperNodes, overrides: {overrides}; seconds per round (train + evaluation)")
    print("| round | simulation s | deployment (TLS, node auth) s | deployment / simulation |")
    print("| --- | --- | --- | --- |")
    for s, d in zip(sim["rounds"], dep["rounds"]):
        print(f"| {s['round']} | {s['seconds']:.2f} | {d['seconds']:.2f} | {d['seconds'] / s['seconds']:.1f}x |")
    later = lambda r: [x["seconds"] for x in r["rounds"][1:]] or [r["rounds"][0]["seconds"]]  # noqa: E731
    s_mean, d_mean = statistics.mean(later(sim)), statistics.mean(later(dep))
    print(f"| mean of rounds 2.. | {s_mean:.2f} | {d_mean:.2f} | {d_mean / s_mean:.1f}x |")
    for name, r in (("simulation", sim), ("deployment", dep)):
        final = r["final"]
        print(f"{name}: final centralized accuracy {final['centralized']['accuracy']:.4f}, "
              f"{final['seconds_total']:.1f} s in the ServerApp")  # fmt: skip
    print(f"ClientApp cold start (python -c 'import app.client_app'): {cold:.2f} s")


if __name__ == "__main__":
    main()
