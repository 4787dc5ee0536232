"""Where an HE round's time goes, party by party, and the least it could cost on this machine.

    python -m benchmarks.he_cost_floor [--params 1076010] [--clients 5] [--cores 2] [--repeats 5]
        [--no-simulation]

Measures, in this process (one core, min of `--repeats`), each party's work per round at the
default `secagg=he` parameters for a model of `--params` values, split into the calls into
SEAL (TenSEAL's `sealapi`: encode, encrypt_symmetric, save; load, decrypt, decode; the
server's load of each seeded update, add, save) and everything around them (fixed point,
MAC tags, masks, checks, packing):
- client, decrypt: `decrypt_model` of the aggregate of `--clients` updates;
- client, masks: `node_mask` equivalent (pairwise masks with the other clients + self mask);
- client, encrypt: `encrypt_update` with that mask;
- server: opening each update (`load_ciphertext` + `seed_id`), summing, saving the sum, and
  the mask correction for the survivors' self masks.

Then the floor: SEAL's share alone, with the clients spread over `--cores` (they run in
parallel, the server after them), added to a plaintext round of the same model in Flower's
simulation measured in the same run (benchmarks/secure_aggregation.py's plaintext mode: 10
SuperNodes, `--clients` sampled, 4 rounds, mean of rounds 2-4). No code of ours can make a
round cheaper than that floor without making fewer or cheaper SEAL calls. A benchmark, not a
timed test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(num_values: int, clients: int, repeats: int) -> dict[str, tuple[float, float]]:
    """{step: (whole step s, of which SEAL s)} per party and round."""
    import tenseal.sealapi as seal

    from protections.he.client import decrypt_model, encrypt_update
    from protections.he.context import (
        HEParams, add_mod_t, load_ciphertext, mask_keypair, new_context, pack_payload, pairwise_mask,
        payload_header, seal_from_bytes, seal_to_bytes, seed_id, unpack_payload,
    )  # fmt: skip
    from protections.he.masks import correction, mask_count, self_mask

    ctx = new_context(HEParams())
    rng = np.random.default_rng(0)
    arrays = [rng.normal(0, 0.1, num_values)]
    count = mask_count(num_values)
    keys = [mask_keypair() for _ in range(clients)]
    publics = [public for _, public in keys]

    def mask():
        total = pairwise_mask(ctx, keys[0][0], publics[0], publics, 1, "bench", count)
        return add_mod_t(total, self_mask(ctx, b"s" * 32, 1, "bench", count), ctx.plain_modulus)

    the_mask = mask()
    updates = [encrypt_update(ctx, arrays, 10, 1, mask=the_mask) for _ in range(clients)]
    blobs = [unpack_payload(u)[1] for u in updates]
    header = unpack_payload(updates[0])[0]

    def server_step():  # what aggregate_fit does per round: open (checks, seed ids), add, save
        opened = [[load_ciphertext(ctx, b) for b in blob] for blob in blobs]
        [[seed_id(ct) for ct in cts] for cts in opened]
        total = opened[0]
        for other in opened[1:]:
            for acc, ct in zip(total, other):
                ctx.evaluator.add_inplace(acc, ct)
        return [seal_to_bytes(ct) for ct in total]

    summed = server_step()
    # The aggregate the clients decrypt: of unmasked updates (the masks above do not cancel,
    # one mask stands for all), so its MAC and weight check pass as after unmasking.
    plain_blobs = [unpack_payload(encrypt_update(ctx, arrays, 10, 1))[1] for _ in range(clients)]
    total = [load_ciphertext(ctx, b) for b in plain_blobs[0]]
    for blob in plain_blobs[1:]:
        for acc, b in zip(total, blob):
            ctx.evaluator.add_inplace(acc, load_ciphertext(ctx, b))
    unmasked_sum = [seal_to_bytes(ct) for ct in total]
    aggregate = pack_payload(
        payload_header(ctx, "aggregate", header["layout"], num_values, 1, divisor=10 * clients, noised=False), unmasked_sum
    )
    shapes = [a.shape for a in arrays]

    def seal_encrypt():
        out = []
        for chunk in np.zeros((len(blobs[0]), ctx.slots), dtype=np.int64):
            plain = seal.Plaintext()
            ctx.encoder.encode(chunk.tolist(), plain)
            out.append(seal_to_bytes(ctx.encryptor.encrypt_symmetric(plain)))
        return out

    def seal_decrypt():
        for data in unmasked_sum:
            plain = seal.Plaintext()
            ctx.decryptor.decrypt(seal_from_bytes(seal.Ciphertext(), data, ctx.seal_context), plain)
            ctx.encoder.decode_int64(plain)

    def seal_server():
        opened = [[seal_from_bytes(seal.Ciphertext(), b, ctx.seal_context) for b in blob] for blob in blobs]
        total = opened[0]
        for other in opened[1:]:
            for acc, ct in zip(total, other):
                ctx.evaluator.add_inplace(acc, ct)
        return [seal_to_bytes(ct) for ct in total]

    # The server's correction when every member survives: their self masks (no pairwise mask
    # is left over), encoded and subtracted from the sum.
    sum_cts = [load_ciphertext(ctx, b) for b in summed]

    def server_unmask():
        leftover = correction(ctx, 1, "bench", num_values, [b"s" * 32] * clients, [], publics)
        padded = np.zeros(len(summed) * ctx.slots, dtype=np.uint64)
        padded[: leftover.size] = leftover
        total = sum_cts
        for ct, chunk in zip(total, padded.reshape(len(total), ctx.slots)):
            plain = seal.Plaintext()
            ctx.encoder.encode(chunk.tolist(), plain)
            ctx.evaluator.sub_plain_inplace(ct, plain)

    zeros = np.zeros((len(sum_cts), ctx.slots), dtype=np.uint64)

    def seal_unmask():
        for ct, chunk in zip(sum_cts, zeros):
            plain = seal.Plaintext()
            ctx.encoder.encode(chunk.tolist(), plain)
            ctx.evaluator.sub_plain_inplace(ct, plain)

    return {
        "client: decrypt the global model": (
            best(lambda: decrypt_model(ctx, aggregate, shapes), repeats), best(seal_decrypt, repeats)
        ),
        "client: masks (pairwise + self)": (best(mask, repeats), 0.0),
        "client: encrypt the update": (
            best(lambda: encrypt_update(ctx, arrays, 10, 1, mask=the_mask), repeats), best(seal_encrypt, repeats)
        ),
        "server: open and sum the updates": (best(server_step, repeats), best(seal_server, repeats)),
        "server: remove the masks": (best(server_unmask, repeats), best(seal_unmask, repeats)),
    }


def plaintext_round(clients: int) -> float:
    """Mean seconds of rounds 2-4 of the plaintext 1M-parameter round in simulation."""
    from app.config import load_config
    from benchmarks.secure_aggregation import MODELS, run_one

    overrides = f"{MODELS['1m'][1]} num_rounds=4 strategy.fraction_evaluate=0 simulation.num_supernodes=10"
    with tempfile.TemporaryDirectory() as tmp:
        rounds = run_one(load_config(overrides), "plaintext", Path(tmp), Path(tmp), 10, clients)
    return statistics.mean(r["seconds"] for r in rounds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=1_076_010, help="model values (default: MLP [1000, 1000])")
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-simulation", action="store_true", help="skip the plaintext round in simulation")
    args = parser.parse_args()
    steps = measure(args.params, args.clients, args.repeats)
    print(f"\n{args.params:,} values, {args.clients} clients, one core, min of {args.repeats}\n")
    print("| step (per party, per round) | whole step, s | of which SEAL, s | around SEAL, s |")
    print("| --- | --- | --- | --- |")
    for step, (whole, in_seal) in steps.items():
        print(f"| {step} | {whole:.3f} | {in_seal:.3f} | {whole - in_seal:.3f} |")
    client = [v for k, v in steps.items() if k.startswith("client")]
    server = [v for k, v in steps.items() if k.startswith("server")]
    waves = -(-args.clients // args.cores)  # clients at one core each, `cores` at a time
    whole = waves * sum(w for w, _ in client) + sum(w for w, _ in server)
    floor = waves * sum(s for _, s in client) + sum(s for _, s in server)
    print(f"\nadded to a round ({args.clients} clients in {waves} waves on {args.cores} cores, then the server):")
    print(f"  all of the work above: {whole:.2f} s; SEAL's calls alone (the floor): {floor:.2f} s")
    if not args.no_simulation:
        base = plaintext_round(args.clients)
        print(f"  plaintext round in simulation (same run): {base:.2f} s")
        print(f"  => HE round >= {(base + floor) / base:.2f}x plaintext from SEAL alone; "
              f"{(base + whole) / base:.2f}x with all of our work")  # fmt: skip


if __name__ == "__main__":
    main()
