"""Metrics out: ``metrics.csv``, TensorBoard, and a progress bar with ETA."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class MetricsLogger:
    """Writes one row per logged step to CSV and TensorBoard and drives the progress bar.

    On resume, rows at or after the resumed step are dropped from the CSV so that
    the file reads as one uninterrupted run.
    """

    def __init__(
        self, output_dir: str | Path, total_steps: int, start_step: int = 0, desc: str = ""
    ) -> None:
        self.output_dir = Path(output_dir)
        self.csv_path = self.output_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        if start_step > 0 and self.csv_path.is_file():
            with self.csv_path.open() as handle:
                self.rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= start_step]
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            log_dir=str(self.output_dir / "tensorboard"), purge_step=start_step + 1
        )
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc=desc,
            dynamic_ncols=True,
            mininterval=1.0,
            file=sys.stderr,
            disable=None,  # off when stderr is not a terminal
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items()}
        self.rows.append({"step": step, **clean})
        for key, value in clean.items():
            if math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self._write_csv()
        shown = {k: clean[k] for k in list(clean)[:4]}
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def _write_csv(self) -> None:
        columns: list[str] = []
        for row in self.rows:
            columns.extend(k for k in row if k not in columns)
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.csv_path)

    def close(self) -> None:
        self.bar.close()
        self.writer.flush()
        self.writer.close()
