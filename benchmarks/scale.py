"""Simulations of 10 to 10,000 SuperNodes, about 10 clients a round: seconds, CPU and memory
per round against N=10, side by side in one run.

    python -m benchmarks.scale                           # N = 10, 100, 1,000, 10,000
    python -m benchmarks.scale --sizes 10 1000 --rounds 3
    python -m benchmarks.scale --sweep-only              # only Flower's dispatch sweep

Each N is one `flwr run` simulation (`dataset=linear model=linear`, one CPU per client) in a
Flower home of its own with free ports, every process it started stopped by PID afterwards.
Every round samples `--clients` clients to train (`strategy.fraction_train=clients/N`,
`strategy.min_train_clients=clients`, so Flower's `max(int(N * fraction), min)` is exactly
that many) and as many to evaluate (`--evaluate`, 0 turns federated evaluation off). The data
set grows with N (`dataset.n_samples`: `--samples-per-client` examples per client after the
server's test split), so each sampled client does the same work at every N.

Per N it prints:
- s/round: wall seconds of rounds 2.. (results.json's per-round `seconds`; round 1 carries
  Ray's start and the first messages);
- round 1 s and the whole `flwr run` in seconds;
- CPU s/round: user + system CPU of the whole process tree (every process with the run's
  FLWR_HOME in its environment: the `flwr` CLI, SuperLink, simulation, Ray), sampled from
  /proc every 0.2 s and accumulated per PID (a process that exits keeps its last sample),
  between the results.json writes of round 1 and the last round, divided by the rounds;
- peak RSS: the largest sum of resident memory over that tree at one sample (shared pages
  counted in every process that maps them, as `ps` does);
- the ratios to the first size (N=10 by default).

Then Flower's dispatch sweep, measured on its own: the simulation engine's loop
(flwr/server/superlink/fleet/vce/vce_api.py `add_messages_to_queue`) asks the in-memory link
state for every node's next message every 0.1 s, and each ask scans every message in the
store (flwr/server/superlink/linkstate/in_memory_linkstate.py `get_message_ins`). One sweep
with N nodes registered and M messages in flight, the same calls on the same classes, timed
here in this process (no Ray, no ClientApp): its cost grows with N x M, which is what
app/server_app.py's dispatch warning estimates.

Timings are wall clock on a shared machine: compare the columns of one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

from tests.support.processes import isolated_flower_env, processes_with_env, stop_flower

SAMPLE_S = 0.2
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- process tree
class TreeSampler(threading.Thread):
    """Every SAMPLE_S seconds: the processes with FLWR_HOME=home, their summed RSS (peak kept)
    and each PID's CPU seconds (the last value seen is kept after it exits); and, when
    results.json changes, the number of rounds recorded with the CPU total at that moment."""

    def __init__(self, home: Path, results: Path) -> None:
        super().__init__(daemon=True)
        self.home, self.results = str(home), results
        self.cpu: dict[int, float] = {}
        self.peak_rss = 0
        self.round_cpu: dict[int, float] = {}  # rounds recorded -> CPU total when first seen
        self.stop_event = threading.Event()
        self._mtime = 0.0

    def cpu_total(self) -> float:
        return sum(self.cpu.values())

    def sample(self) -> None:
        rss = 0
        for pid in processes_with_env("FLWR_HOME", self.home):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
            self.cpu[pid] = (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
            rss += pages * PAGE
        self.peak_rss = max(self.peak_rss, rss)
        try:
            mtime = self.results.stat().st_mtime
        except OSError:
            return
        if mtime != self._mtime:
            self._mtime = mtime
            try:
                rounds = len(json.loads(self.results.read_text()).get("rounds", []))
            except ValueError:  # caught mid-write
                self._mtime = 0.0
                return
            self.round_cpu.setdefault(rounds, self.cpu_total())

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(SAMPLE_S)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()
        self.sample()


def overrides_for(n: int, args) -> str:
    """The experiment at N SuperNodes: `clients` sampled to train (and `evaluate` to evaluate)
    per round, `samples_per_client` examples per client."""
    k = min(args.clients, n)
    e = min(args.evaluate, n)
    test_fraction = 0.2  # dataset=linear's default
    samples = math.ceil(n * args.samples_per_client / (1 - test_fraction))
    parts = [
        "dataset=linear", "model=linear", f"dataset.n_samples={samples}",
        f"num_rounds={args.rounds}", f"simulation.num_supernodes={n}",
        f"strategy.fraction_train={k / n!r}", f"strategy.min_train_clients={k}",
        f"strategy.fraction_evaluate={e / n!r}", f"strategy.min_evaluate_clients={max(e, 1)}",
        f"strategy.min_available_clients={max(k, e)}",
    ]  # fmt: skip
    return " ".join(parts)


def run_size(work: Path, n: int, args) -> dict:
    """One `flwr run` simulation of N SuperNodes, sampled; everything it started stopped."""
    from app.config import load_config
    from app.sweep import flwr_run_command, hydra_quote, stream_process
    from core.config import parse_overrides

    home, out = work / f"home-{n}", work / f"run-{n}"
    home.mkdir(parents=True)
    out.mkdir(parents=True)
    overrides = f"{overrides_for(n, args)} output_dir={hydra_quote(str(out))}"
    tokens = list(parse_overrides(overrides))
    cfg = load_config(tokens)
    env = {**os.environ, **isolated_flower_env(home)}
    sampler = TreeSampler(home, out / "results.json")
    log_path = out / "flwr.log"
    started = time.perf_counter()
    sampler.start()
    try:
        with log_path.open("w", buffering=1) as log:
            returncode, timed_out = stream_process(
                flwr_run_command(cfg, tokens, uuid.uuid4().hex), env, log.write,
                timeout_s=args.timeout,
            )
        wall = time.perf_counter() - started
    finally:
        sampler.stop()
        stop_flower(home)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    status = results.get("run", {}).get("status")
    rounds = results.get("rounds", [])
    if timed_out or status != "completed" or len(rounds) != args.rounds:
        why = "timed out" if timed_out else f"status {status}, flwr run exited {returncode}"
        return {"n": n, "ok": False, "why": f"{why}, {len(rounds)} rounds; log: {log_path}",
                "wall": wall, "peak_rss": sampler.peak_rss}  # fmt: skip
    first, last = sampler.round_cpu.get(1), sampler.round_cpu.get(args.rounds)
    later = [r["seconds"] for r in rounds[1:]]
    cpu = (last - first) / (args.rounds - 1) if first is not None and last is not None else math.nan
    return {
        "n": n, "ok": True, "wall": wall, "round1": rounds[0]["seconds"],
        "per_round": statistics.mean(later), "cpu_per_round": cpu, "peak_rss": sampler.peak_rss,
        "processes": len(sampler.cpu),
    }  # fmt: skip


# --------------------------------------------------------------------------- Flower's sweep
def _link_state(num_nodes: int, in_flight: int):
    """Flower's in-memory link state as the simulation sets it up (flwr/simulation/
    run_simulation.py `_main_loop`, vce_api.py `_register_nodes`) with `in_flight` messages
    pushed through the ServerApp's InMemoryGrid, one per node."""
    from flwr.app import Message, RecordDict
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id = 1, run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    state = factory.state()
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    nodes = _register_nodes(num_nodes=num_nodes, state_factory=factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    targets = list(nodes)[:in_flight]
    grid.push_messages([Message(RecordDict(), node, "train", ttl=3600.0) for node in targets])
    return state, nodes


def sweep_seconds(num_nodes: int, in_flight: int, repeats: int = 3) -> float:
    """Median seconds of one pass of vce_api.py add_messages_to_queue's loop body. The
    first pass marks the messages delivered; they stay in the store until their replies are
    pulled, so later passes scan them all the same (what happens while clients work)."""
    state, nodes = _link_state(num_nodes, in_flight)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for node_id in nodes.keys():
            state.get_message_ins(node_id=node_id, limit=1)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


SWEEP_CASES = [(10, 5), (100, 50), (1_000, 10), (1_000, 100), (1_000, 500), (10_000, 10),
               (10_000, 32), (10_000, 100)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1_000, 10_000])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=10, help="trained per round")
    parser.add_argument("--evaluate", type=int, default=10, help="evaluated per round (0: off)")
    parser.add_argument("--samples-per-client", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per size")
    parser.add_argument("--keep", help="write the runs (results.json, flwr.log) under this new folder")
    parser.add_argument("--sweep-only", action="store_true")
    parser.add_argument("--no-sweep", action="store_true")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (round 1 carries the start-up)")

    if not args.sweep_only:
        rows = []
        with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
            work = Path(args.keep or tmp)
            for n in args.sizes:
                row = run_size(work, n, args)
                rows.append(row)
                state = f"ok, {row['processes']} processes" if row["ok"] else f"FAILED: {row['why']}"
                print(f"N={n}: {state} ({row['wall']:.0f} s)", flush=True)
        print()
        print(f"{args.clients} clients train and {args.evaluate} evaluate per round, "
              f"{args.rounds} rounds, dataset=linear model=linear, "
              f"{args.samples_per_client} examples per client; means over rounds 2..")  # fmt: skip
        base = next((r for r in rows if r["ok"]), None)
        print("| N | s/round | x | CPU s/round | x | peak RSS GiB | x | round 1 s | flwr run s |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            gib = r["peak_rss"] / 2**30
            if not r["ok"]:
                print(f"| {r['n']:,} | failed | | | | {gib:.2f} | | | {r['wall']:.0f} |")
                continue
            bgib = base["peak_rss"] / 2**30
            print(
                f"| {r['n']:,} | {r['per_round']:.2f} | {r['per_round'] / base['per_round']:.2f} "
                f"| {r['cpu_per_round']:.2f} | {r['cpu_per_round'] / base['cpu_per_round']:.2f} "
                f"| {gib:.2f} | {gib / bgib:.2f} | {r['round1']:.1f} | {r['wall']:.0f} |"
            )
        print()
    if args.no_sweep:
        return
    print("Flower's dispatch sweep (vce_api.py add_messages_to_queue), in this process, median of 3")
    print("| N nodes | M in flight | N x M | sweep s | us per node x message |")
    print("| --- | --- | --- | --- | --- |")
    for n, m in SWEEP_CASES:
        s = sweep_seconds(n, m)
        print(f"| {n:,} | {m} | {n * m:,} | {s:.3f} | {1e6 * s / (n * m):.1f} |", flush=True)


if __name__ == "__main__":
    main()
