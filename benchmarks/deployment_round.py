"""Deployed rounds vs the same rounds simulated, and the deployment round path before and after
app/grid_messages.py, side by side in one go.

    python -m benchmarks.deployment_round [--runs simulation,before,after,minimal,after-fused]
        [--rounds 4] [--supernodes 3] [--overrides "..."] [--keep DIR]

Each run trains the same experiment (the default one: digits, MLP, FedAvg sampling 2 of 3
nodes) for `--rounds` rounds (4: with evaluate_every=2, rounds 1 and 3 skip federated
evaluation):
- simulation: `flwr run .` on Flower's simulation engine with N SuperNodes (1 CPU each);
- before: the project deployed as it was: a SuperLink with TLS and node authentication and N
  SuperNodes on loopback, started as README "Deploy across machines" does (`partition-id=i
  num-partitions=N`, so every run trains on identical data), the rounds' messages through
  Flower's Grid as shipped (run config `shipped-grid=true`: 3 s between pulls), SuperNodes at
  Flower's default SuperExec task poll (1 s);
- after-exec1s: as `after`, but SuperNodes at Flower's default task poll (1 s);
- after: replies collected every 0.1 s (app/grid_messages.py), SuperNodes started with
  FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1 as the README now starts them;
- after-eval2: `after` plus strategy.evaluate_every=2;
- after-fused: `after` plus strategy.evaluate_with_train=true (each train message evaluates the
  model it brings before training: one message per node a round, evaluate messages in the
  last round only, federated metrics every round);
- minimal: benchmarks/minimal_app (a plain Flower app: Message API FedAvg, the same MLP on
  the same partitions, Flower's Grid as shipped) on the SuperNodes of `after`.
The deployed runs share one SuperLink and SuperNodes per SuperNode setting (`before` and
`after-exec1s` one, `after`, `after-eval2`, `after-fused` and `minimal` the other), one run after the other.
Prints each round's wall seconds from each run's results.json (train + centralized and
federated evaluation), the means over rounds 2.. (round 1 carries the simulation's Ray
start-up, and in deployment the partition-id query), each run's ratio to `before`, and from the
SuperNodes' logs (every line timestamped here) where a deployed round's time goes: the slowest
node's time from "Receiving" to "Sending" a message, per stage (the SuperExec's task poll, a
fresh ClientApp process, the work, the SuperNode's 0.5 s reply wait), and the rest of the
round outside the ClientApps (the ServerApp noticing replies, the SuperNode's own 3 s idle
poll, aggregation and centralized evaluation), and each node's wait from its train reply to
its evaluate message. `--keep DIR` keeps every log.
Every process started is stopped by PID. A benchmark, not a timed test: compare the columns.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.processes import SUPEREXEC_TASK_POLL, free_port, isolated_flower_env, stop_flower

ROOT = Path(__file__).resolve().parents[1]
MINIMAL_APP = ROOT / "benchmarks" / "minimal_app"
((TASK_POLL_ENV, TUNED_TASK_POLL_S),) = SUPEREXEC_TASK_POLL.items()  # as the README starts SuperNodes


@dataclass(frozen=True)
class Variant:
    name: str
    app: Path = ROOT
    shipped_grid: bool = False
    task_poll: str | None = TUNED_TASK_POLL_S  # None: Flower's default (1 s)
    overrides: str = ""


VARIANTS = {
    v.name: v
    for v in (
        Variant("before", shipped_grid=True, task_poll=None),
        Variant("after-exec1s", task_poll=None),
        Variant("after"),
        Variant("after-eval2", overrides="strategy.evaluate_every=2"),
        Variant("after-fused", overrides="strategy.evaluate_with_train=true"),
        Variant("minimal", app=MINIMAL_APP),
    )
}
RUN_NAMES = ("simulation", *VARIANTS)
DEFAULT_RUNS = "simulation,before,after,minimal,after-fused"


def base_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, **isolated_flower_env(home)}


def flwr_run(env: dict, app: Path, target: list[str], run_config: str, log: Path | None = None) -> None:
    """`flwr run ... --stream`; its output (the ServerApp's log) into `log` when given."""
    cmd = ["flwr", "run", str(app), *target, "--stream", "--run-config", run_config]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def simulate(work: Path, n: int, overrides: str) -> dict:
    home = work / "sim_home"
    env = base_env(home)
    try:
        flwr_run(env, ROOT, ["--federation-config", f"num-supernodes={n} client-resources-num-cpus=1"],
                 f'overrides="{overrides} output_dir={work / "sim"}"')  # fmt: skip
    finally:
        stop_flower(home)
    return json.loads((work / "sim" / "results.json").read_text())


class TimestampedLog:
    """A process's output, each line prefixed with the wall time it was read at."""

    def __init__(self, path: Path, stream) -> None:
        self.path = path
        self._file = path.open("w")
        self._thread = threading.Thread(target=self._copy, args=(stream,), daemon=True)
        self._thread.start()

    def _copy(self, stream) -> None:
        for line in iter(stream.readline, b""):
            self._file.write(f"{time.time():.3f} {line.decode(errors='replace')}")
            self._file.flush()

    def close(self) -> None:
        self._thread.join(10)
        self._file.close()


@dataclass
class Deployment:
    """A SuperLink (TLS, node authentication) and n SuperNodes on loopback."""

    work: Path
    n: int
    task_poll: str | None
    logs: list[TimestampedLog] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.home = self.work / "home"
        self.env = base_env(self.home)

    def start(self, name: str, cmd: list[str], env: dict) -> None:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.logs.append(TimestampedLog(self.work / f"{name}.log", proc.stdout))

    def up(self) -> None:
        from app.deploy import write_credentials

        creds = self.work / "creds"
        write_credentials(creds, self.n, ["127.0.0.1"])
        port = free_port()
        self.start("superlink", [
            "flower-superlink", "--ssl-ca-certfile", str(creds / "ca.crt"),
            "--ssl-certfile", str(creds / "superlink/server.crt"),
            "--ssl-keyfile", str(creds / "superlink/server.key"), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
        ], self.env)  # fmt: skip
        subprocess.run(["flwr", "config", "list"], env=self.env, capture_output=True, check=True)
        with (self.home / "config.toml").open("a") as f:
            f.write(f'\n[superlink.bench]\naddress = "127.0.0.1:{port}"\n'
                    f'root-certificates = "{creds / "ca.crt"}"\n')  # fmt: skip
        node_env = {k: v for k, v in self.env.items() if k != TASK_POLL_ENV}  # None: Flower's default
        if self.task_poll is not None:
            node_env[TASK_POLL_ENV] = self.task_poll
        for i in range(self.n):
            for _ in range(60):  # until the SuperLink answers
                reg = subprocess.run(
                    ["flwr", "supernode", "register", str(creds / f"supernode-{i}/auth.pub"), "bench"],
                    env=self.env, capture_output=True, text=True,
                )  # fmt: skip
                if reg.returncode == 0:
                    break
                time.sleep(1)
            else:
                raise RuntimeError(f"cannot register SuperNode {i}: {reg.stdout}{reg.stderr}")
            self.start(f"supernode-{i}", [
                "flower-supernode", "--superlink", f"127.0.0.1:{port}",
                "--root-certificates", str(creds / "ca.crt"),
                "--auth-supernode-private-key", str(creds / f"supernode-{i}/auth.key"),
                "--port", str(free_port()), "--node-config", f"partition-id={i} num-partitions={self.n}",
            ], node_env)  # fmt: skip
        for i in range(self.n):
            for _ in range(120):
                if "SuperNode ID:" in (self.work / f"supernode-{i}.log").read_text():
                    break
                time.sleep(0.5)
            else:
                raise RuntimeError(f"SuperNode {i} did not connect; see {self.work}/supernode-{i}.log")

    def down(self) -> None:
        stop_flower(self.home)
        for log in self.logs:
            log.close()

    def run(self, v: Variant, overrides: str) -> dict:
        out = self.work / v.name
        full = f"{overrides} {v.overrides}".strip()
        if v.app == MINIMAL_APP:
            run_config = f'overrides="{full}" output-dir="{out}"'
        else:
            run_config = f'overrides="{full} output_dir={out}"' + (" shipped-grid=true" if v.shipped_grid else "")
        flwr_run(self.env, v.app, ["bench"], run_config, self.work / f"flwr-run-{v.name}.log")
        result = json.loads((out / "results.json").read_text())
        return result


MESSAGE_LINE = re.compile(r"^(\d+\.\d+) .*?(Receiving|Sending): (\w+) message")
RUN_LINE = re.compile(r"\[RUN (\d+)(?:, ROUND (\d+))?\]")


def node_events(work: Path, n: int) -> dict[str, list[tuple[int, str, float, float]]]:
    """Flower run id -> (node, message type, round, hold) for every message a SuperNode
    handled, from the SuperNodes' timestamped logs: `hold` is the seconds from its
    "Receiving" line to its "Sending" line (the SuperExec's task poll, a fresh ClientApp
    process, the work, the SuperNode's 0.5 s wait for the reply). Runs in order of their
    first message."""
    runs: dict[str, list] = {}
    for node in range(n):
        path = work / f"supernode-{node}.log"
        if not path.exists():
            continue
        run_id, rnd, received = "", 0, {}
        for line in path.read_text(errors="replace").splitlines():
            if (r := RUN_LINE.search(line)) is not None:
                run_id, rnd = r.group(1), int(r.group(2) or 0)
            m = MESSAGE_LINE.match(line)
            if m is None:
                continue
            t, what, kind = float(m.group(1)), m.group(2), m.group(3)
            if what == "Receiving":
                received[kind] = t
            elif kind in received:
                runs.setdefault(run_id, []).append((node, kind, rnd, received.pop(kind), t))
    first = {run: min(e[3] for e in events) for run, events in runs.items()}
    return {run: runs[run] for run in sorted(runs, key=first.get)}


def numbered(events: list) -> list:
    """`events` with round numbers where the messages carry none (Flower's Message API
    strategies leave group_id empty: the minimal app): round k starts with the k-th train
    message received after an evaluate message (or, without any evaluate message, more than
    the SuperNode's 3 s poll after the previous train message)."""
    if any(rnd for _, kind, rnd, _, _ in events if kind == "train"):
        return events
    evaluates = sorted(e[3] for e in events if e[1] == "evaluate")
    starts: list[float] = []
    last = None
    for t in sorted(e[3] for e in events if e[1] == "train"):
        between = any(last is not None and last < x < t for x in evaluates)
        if last is None or between or (not evaluates and t - last > 3.5):
            starts.append(t)
        last = t
    return [(node, kind, bisect.bisect_right(starts, start) if kind in ("train", "evaluate") else 0, start, end)
            for node, kind, _, start, end in events]  # fmt: skip


def round_breakdown(events: list, rounds: list[dict]) -> dict[str, list[float]]:
    """Per round 2..: the slowest node's hold of each stage (train, evaluate) and what is left
    of the round's seconds outside them: the polls between a reply and the next message
    (the ServerApp's Grid, the SuperNode's 3 s idle poll) plus the server's own work."""
    out: dict[str, list[float]] = {}
    events = numbered(events)
    for record in rounds[1:]:
        holds = {}
        for _, kind, rnd, start, end in events:
            if rnd == record["round"] and kind in ("train", "evaluate"):
                holds[kind] = max(holds.get(kind, 0.0), end - start)
        if "train" not in holds:
            continue
        for kind, hold in holds.items():
            out.setdefault(f"slowest {kind} in a ClientApp", []).append(hold)
        out.setdefault("outside ClientApps", []).append(record["seconds"] - sum(holds.values()))
    # each node's wait from its train reply to receiving its evaluate message of the round:
    # the ServerApp noticing the stage's replies, its work, and the SuperNode's 3 s idle poll
    for node, kind, rnd, _, end in events:
        if kind == "train" and rnd > 1:
            nxt = [s for n, k, r, s, _ in events if n == node and k == "evaluate" and r == rnd]
            if nxt:
                out.setdefault("train reply -> evaluate received", []).append(min(nxt) - end)
    return out


def cold_start_seconds() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import app.client_app"], cwd=ROOT, check=True)
    return time.perf_counter() - start


def later(result: dict) -> list[float]:
    rounds = [r["seconds"] for r in result["rounds"]]
    return rounds[1:] or rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma separated, of {', '.join(RUN_NAMES)}")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--supernodes", type=int, default=3)
    parser.add_argument("--overrides", default="", help="Hydra overrides for every run")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the runs and every process's timestamped log under this "
                        "(new) folder and keep them; default: a temporary folder")  # fmt: skip
    args = parser.parse_args()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUN_NAMES]
    if unknown or not runs:
        parser.error(f"--runs: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(RUN_NAMES)}")
    overrides = f"num_rounds={args.rounds} {args.overrides}".strip()
    results: dict[str, dict] = {}
    breakdown: dict[str, dict[str, list[float]]] = {}
    started = time.perf_counter()
    if args.keep is not None:
        args.keep.mkdir(parents=True)  # a new folder: never mixes logs of two benchmarks
    with tempfile.TemporaryDirectory(prefix="deploy-bench-") as tmp:
        work = Path(tmp) if args.keep is None else args.keep.resolve()
        if "simulation" in runs:
            results["simulation"] = simulate(work, args.supernodes, overrides)
        # one deployment per SuperNode setting, its runs in the order asked
        for task_poll in dict.fromkeys(VARIANTS[r].task_poll for r in runs if r in VARIANTS):
            dep = Deployment(work / f"deploy-poll-{task_poll or 'default'}", args.supernodes, task_poll)
            names = [r for r in runs if r in VARIANTS and VARIANTS[r].task_poll == task_poll]
            try:
                dep.up()
                for name in names:
                    results[name] = dep.run(VARIANTS[name], overrides)
            finally:
                dep.down()
            # the deployment's Flower runs, in order, are `names`
            for name, events in zip(names, node_events(dep.work, args.supernodes).values()):
                breakdown[name] = round_breakdown(events, results[name]["rounds"])
        cold = cold_start_seconds()
    names = [r for r in runs if r in results]
    print(f"{args.supernodes} SuperNodes, overrides: {overrides}; seconds per round (train + evaluation); "
          f"{time.perf_counter() - started:.0f} s in all")  # fmt: skip
    print("| round | " + " | ".join(f"{n} s" for n in names) + " |")
    print("| --- |" + " --- |" * len(names))
    for i in range(max(len(results[n]["rounds"]) for n in names)):
        cells = [f"{results[n]['rounds'][i]['seconds']:.2f}" if i < len(results[n]["rounds"]) else "" for n in names]
        print(f"| {i + 1} | " + " | ".join(cells) + " |")
    means = {n: statistics.mean(later(results[n])) for n in names}
    print("| mean of rounds 2.. | " + " | ".join(f"{means[n]:.2f}" for n in names) + " |")
    if "before" in means:
        print("| before / run | " + " | ".join(f"{means['before'] / means[n]:.2f}x" for n in names) + " |")
    # From the SuperNodes' logs (deployed runs only): means over rounds 2..
    for key in ("slowest train in a ClientApp", "slowest evaluate in a ClientApp", "outside ClientApps",
                "train reply -> evaluate received"):  # fmt: skip
        cells = [f"{statistics.mean(breakdown[n][key]):.2f}" if breakdown.get(n, {}).get(key) else "" for n in names]
        print(f"| {key} | " + " | ".join(cells) + " |")
    for name in names:
        final = results[name]["final"]
        central = final.get("centralized", {}).get("accuracy")
        rounds = results[name]["rounds"]
        evaluated = sum(1 for r in rounds if r.get("federated"))
        ours = name not in VARIANTS or VARIANTS[name].app == ROOT  # the minimal app records none
        print(f"{name}: final centralized accuracy {central:.4f}, {final['seconds_total']:.1f} s in the "
              f"ServerApp" + (f", federated metrics in {evaluated} of {len(rounds)} rounds" if ours else ""))  # fmt: skip
    print(f"ClientApp cold start (python -c 'import app.client_app'): {cold:.2f} s")
    if args.keep is not None:
        print(f"Runs and timestamped logs kept in {work}")


if __name__ == "__main__":
    main()
