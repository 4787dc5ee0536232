"""What the CSPRNG noise source costs: SecureGaussian (os.urandom + Box-Muller, the default of
every DP mechanism) against NumPy's PCG64 (used only when reproducible noise is forced), side
by side in one run, for the noise of one round at several model sizes.

    python -m benchmarks.noise_source
"""

from __future__ import annotations

import time

import numpy as np

from protections.dp.mechanisms import SecureGaussian


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    secure, pcg = SecureGaussian(), np.random.default_rng(0)
    print("| parameters | CSPRNG ms | NumPy ms | ratio |")
    print("| --- | --- | --- | --- |")
    for n in (4_810, 151_000, 1_000_000, 10_000_000):
        s = best_of(lambda: secure.normal(0.0, 1.0, (n,)))
        p = best_of(lambda: pcg.normal(0.0, 1.0, n))
        print(f"| {n:,} | {s * 1e3:.2f} | {p * 1e3:.2f} | {s / p:.1f}x |")


if __name__ == "__main__":
    main()
