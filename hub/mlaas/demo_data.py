"""Sample data for the demo origin, made here (nothing is downloaded): a small particle-physics
style event table as Parquet and CSV under /store/demo."""

from __future__ import annotations

from pathlib import Path

import numpy as np

NAMESPACE = "store/demo"


def events(n: int = 20_000, seed: int = 42) -> dict[str, np.ndarray]:
    """Two classes of 'events' (signal, background) with a few features a model can learn."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, n)
    pt = rng.gamma(2.0 + label, 15.0, n)
    eta = rng.normal(0.0, 1.2 - 0.4 * label, n)
    mass = rng.normal(91.0 + 34.0 * label, 8.0 + 4.0 * label, n)
    njets = rng.poisson(2 + 2 * label, n)
    return {"pt": pt, "eta": eta, "mass": mass, "njets": njets, "label": label}


def write_demo_data(root: Path) -> list[Path]:
    """Write the sample files under `root/store/demo`; return their paths. Idempotent."""
    import pandas as pd

    target = root / NAMESPACE
    target.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(events())
    files = [target / "events.parquet", target / "events.csv"]
    if not files[0].exists():
        frame.to_parquet(files[0], index=False)
    if not files[1].exists():
        frame.to_csv(files[1], index=False)
    (target / "README.txt").write_text("MLaaS Hub demo data: events.parquet / events.csv (label: 1 = signal)\n")
    return files
