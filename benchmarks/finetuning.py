"""Fine-tuning and compression side by side on digits, from one run of this script.

    python -m benchmarks.finetuning [--rounds 10] [--supernodes 10] [--json out.json]

Every configuration is a full `flwr run` simulation (app.sweep.run_experiment) on the same
data: `dataset.public_fraction=0.2` everywhere, so the clients hold the same examples whether
or not a pretrained checkpoint is used, and the checkpoint (`python -m app.pretrain`, MLP [64])
has seen only the public split. Measured:
1. compression none / fp16 / int8 (from scratch, all tensors): bytes up and down per round
   (comm in results.json: the serialized arrays that crossed) and final accuracy;
2. rounds until the centralized accuracy first reaches 0.9, from scratch vs from the
   checkpoint with `model.trainable=head` (round 0: the initial model), and from the checkpoint
   with LoRA adapters on both Linear layers (`model.lora.r=4`: only the 808 adapter values travel);
3. `secagg=he` bytes per round with all tensors vs only the head encrypted (2 rounds each);
4. the int8 edge model of every plaintext run: size on disk and accuracy next to model.pt's;
5. the capability workload (capabilities 1, 0.5, 0.25) vs uniform: simulated round time
   (protections/workload/wire.py) and final accuracy.
Runs in its own Flower home with its own ports and stops what it started.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from tests.support.processes import isolated_flower_env, stop_flower


TARGET = 0.9


def rounds_to(results: dict, target: float) -> int | None:
    if results.get("initial", {}).get("centralized", {}).get("accuracy", 0) >= target:
        return 0
    for r in results["rounds"]:
        if r.get("centralized", {}).get("accuracy", 0) >= target:
            return r["round"]
    return None


def per_round(results: dict, key: str) -> float:
    rounds = results["rounds"]
    return sum(r["comm"][key] for r in rounds) / len(rounds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--supernodes", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="finetuning-bench-"))
    home = str(work / "flwr_home")
    os.environ.update(isolated_flower_env(home))
    from app.pretrain import pretrain
    from app.sweep import run_experiment

    common = f"dataset.public_fraction=0.2 simulation.num_supernodes={args.supernodes}"
    ckpt = work / "pretrained.pt"
    meta = pretrain(["dataset.public_fraction=0.2"], ckpt, epochs=20)
    print(f"checkpoint: {meta['public_examples']} public examples, test accuracy {meta['test']['accuracy']:.4f}")
    runs = {
        "none": f"compression=none num_rounds={args.rounds}",
        "fp16": f"compression=fp16 num_rounds={args.rounds}",
        "int8": f"compression=int8 num_rounds={args.rounds}",
        "head": f"model.pretrained={ckpt} model.trainable=head num_rounds={args.rounds}",
        "lora": f"model.pretrained={ckpt} model.lora.r=4 num_rounds={args.rounds}",
        "capability": f"workload=capability num_rounds={args.rounds}",
        "he_all": "secagg=he num_rounds=2",
        "he_head": f"secagg=he model.pretrained={ckpt} model.trainable=head num_rounds=2",
    }
    results = {}
    try:
        for name, overrides in runs.items():
            print(f"--- {name}: {overrides}", flush=True)
            results[name] = run_experiment(f"{common} {overrides}", work / name)
    finally:
        stop_flower(home)

    def acc(name):
        return results[name]["final"]["centralized"]["accuracy"]

    lines = [
        "| what | setting | bytes up / round | bytes down / round | final accuracy | rounds to 0.9 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("none", "fp16", "int8"):
        up = per_round(results[name], "bytes_up")
        ratio = per_round(results["none"], "bytes_up") / up
        lines.append(
            f"| compression | `compression={name}` (all tensors, from scratch) | {up:,.0f} "
            f"({'baseline' if name == 'none' else f'{ratio:.2f}x fewer'}) "
            f"| {per_round(results[name], 'bytes_down'):,.0f} | {acc(name):.4f} | {rounds_to(results[name], TARGET)} |"
        )
    for name, what in (("head", "`model.trainable=head`"), ("lora", "LoRA adapters, `model.lora.r=4`")):
        lines.append(
            f"| fine-tuning | from the checkpoint, {what} | {per_round(results[name], 'bytes_up'):,.0f} "
            f"| {per_round(results[name], 'bytes_down'):,.0f} | {acc(name):.4f} | {rounds_to(results[name], TARGET)} |"
        )
    for name, what in (("he_all", "all 4,810 values encrypted"), ("he_head", "head only (650 values) encrypted")):
        lines.append(
            f"| `secagg=he` | {what} | {per_round(results[name], 'bytes_up'):,.0f} "
            f"| {per_round(results[name], 'bytes_down'):,.0f} | (2 rounds) | - |"
        )
    lines += [
        "",
        "| run | model.pt bytes | model_int8.pt bytes | ratio | accuracy fp32 | accuracy int8 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("none", "fp16", "int8", "head", "lora", "capability"):
        f = results[name]["final"]
        q = f["int8_model"]
        lines.append(
            f"| {name} | {f['model_bytes']:,} | {q['bytes']:,} | {f['model_bytes'] / q['bytes']:.2f}x "
            f"| {acc(name):.4f} | {q['centralized']['accuracy']:.4f} |"
        )
    lines += [
        "",
        "| workload | simulated round time (mean, full-speed steps) | uniform workload, same clients | final accuracy |",
        "| --- | --- | --- | --- |",
    ]
    for name in ("none", "capability"):
        w = [r["workload"] for r in results[name]["rounds"]]
        t = sum(x["round_time"] for x in w) / len(w)
        u = sum(x["round_time_uniform"] for x in w) / len(w)
        label = "`workload=uniform`" if name == "none" else "`workload=capability` [1, 0.5, 0.25]"
        lines.append(f"| {label} | {t:.1f} | {u:.1f} | {acc(name):.4f} |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": meta, "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
