"""The run's logs: ``log.csv`` (every loss), ``validation.csv`` and optional TensorBoard; rank 0 only.

``seconds`` is the cumulative training time across resumes, so time-to-quality curves stay continuous. A resumed
run first drops the rows that followed its checkpoint (they are re-run), rewriting each file atomically.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

from volsynth.utils import atomic_write_text

log = logging.getLogger(__name__)


class RunLogger:
    """Appends rows to ``log.csv`` / ``validation.csv`` in ``out_dir``; silent when not ``enabled``."""

    def __init__(self, out_dir: Path, *, enabled: bool, tensorboard: bool, keep_until: int) -> None:
        self.enabled = enabled
        self.path = out_dir / "log.csv"
        self.val_path = out_dir / "validation.csv"
        self.fields: list[str] | None = None
        self.val_fields: list[str] | None = None
        self.writer: Any = None
        if not enabled:
            return
        for path in (self.path, self.val_path):
            truncate_csv(path, keep_until)
        self.fields = _header(self.path)
        self.val_fields = _header(self.val_path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed (pip install -e '.[tensorboard]'); CSV logging only")

    def log(self, iteration: int, seconds: float, lr: float, losses: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"iteration": iteration, "seconds": round(seconds, 3), "lr": lr, **losses}
        self.fields = _append(self.path, self.fields, row)
        if self.writer is not None:
            for key, value in losses.items():
                self.writer.add_scalar(f"loss/{key}", value, iteration)
            self.writer.add_scalar("lr", lr, iteration)

    def log_validation(self, iteration: int, seconds: float, scores: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"iteration": iteration, "seconds": round(seconds, 3), **scores}
        self.val_fields = _append(self.val_path, self.val_fields, row)
        if self.writer is not None:
            for key, value in scores.items():
                self.writer.add_scalar(f"val/{key}", value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _header(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    with path.open(newline="") as handle:
        return next(csv.reader(handle), None)


def _append(path: Path, fields: list[str] | None, row: dict[str, Any]) -> list[str]:
    new = fields is None
    fields = fields or list(row)
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)
    return fields


def truncate_csv(path: Path, keep_until: int) -> None:
    """Keep the header and the rows with ``iteration <= keep_until`` (atomically; none when ``keep_until`` is 0)."""
    if not path.is_file():
        return
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= keep_until]
    if keep_until == 0:
        kept = []
    buffer = io.StringIO()
    csv.writer(buffer).writerows(kept)
    if kept:
        atomic_write_text(path, buffer.getvalue())
    else:
        path.unlink()
