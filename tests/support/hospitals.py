"""A generated tabular data set of three hospitals with site shift (tests/test_tabular.py, and
the example files of README "Your own data": `python -m tests.support.hospitals
examples/tabular` wrote examples/tabular/hospitals.csv and hospitals_test.csv).

Each patient's outcome (0/1) follows a logistic model of their true age, lactate, ward and sex.
The sites differ in two ways a federation meets:
- measurement shift: hospital `b`'s lab reports lactate LACTATE_OFFSET mmol/L too high (a
  calibration artefact: per-site standardization removes it);
- population shift: hospital `c`'s patients are older and more often in the ICU, so more of
  them die (real signal between sites: per-site standardization removes part of it).
Missing values: `missing_rate` of lactate and of ward are empty cells.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

SITES = ("a", "b", "c")
WARDS = ["icu", "surgery", "medicine"]
LACTATE_OFFSET = 1.5
COLUMNS = ["hospital_id", "age", "bp", "lactate", "ward", "sex", "outcome"]


def hospitals(
    n_per_site: int = 200, seed: int = 0, missing_rate: float = 0.05, lactate_offset: float = LACTATE_OFFSET
):
    """A DataFrame of 3 * n_per_site patients, the sites' rows in blocks a, b, c; hospital b
    measures lactate `lactate_offset` too high (0: the sites differ only in population)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    frames = []
    for site in SITES:
        n = n_per_site
        older = site == "c"
        age = rng.normal(70 if older else 55, 12, n)
        ward = rng.choice(WARDS, n, p=[0.5, 0.25, 0.25] if older else [0.2, 0.4, 0.4])
        sex = rng.choice(["F", "M"], n)
        lactate = rng.gamma(4.0, 0.5, n)  # mmol/L, mean 2
        bp = rng.normal(125, 15, n)  # no effect on the outcome: a distractor
        logit = 0.08 * (age - 60) + 1.2 * (lactate - 2) + 1.5 * (ward == "icu") - 0.4 * (sex == "F") - 0.3
        outcome = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
        measured = lactate + (lactate_offset if site == "b" else 0.0)
        frame = pd.DataFrame(
            {
                "hospital_id": site,
                "age": age.round(1),
                "bp": bp.round(0),
                "lactate": measured.round(2),
                "ward": ward,
                "sex": sex,
                "outcome": outcome,
            }
        )
        frame["ward"] = frame["ward"].astype(object)
        frame.loc[rng.random(n) < missing_rate, "lactate"] = np.nan
        frame.loc[rng.random(n) < missing_rate, "ward"] = None
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)[COLUMNS]


def main(out: str) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    hospitals(100, seed=1).to_csv(folder / "hospitals.csv", index=False)
    hospitals(50, seed=2).to_csv(folder / "hospitals_test.csv", index=False)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "examples/tabular")
