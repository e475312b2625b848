"""Training metrics: one JSON object per logged step (metrics.jsonl), the same as CSV, a loss-curve PNG."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Any

COLUMNS = ["step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "val_loss", "val_ppl"]


class MetricsLog:
    """Appends rows to out/metrics.jsonl and out/metrics.csv (main process only: enabled=False elsewhere)."""

    def __init__(self, out: Path, enabled: bool = True) -> None:
        self.jsonl, self.csv, self.png = out / "metrics.jsonl", out / "metrics.csv", out / "loss.png"
        self.enabled = enabled

    def rows(self) -> list[dict[str, Any]]:
        """Every logged row so far."""
        if not self.jsonl.is_file():
            return []
        rows = []
        for line in self.jsonl.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a half-written last line: the run was killed while logging
                continue
        return rows

    def truncate(self, step: int) -> None:
        """Forget rows after `step`: a resumed run logs them again (a killed run may have logged past
        its last checkpoint)."""
        if not self.enabled:
            return
        rows = [r for r in self.rows() if r["step"] <= step]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with open(self.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def log(self, row: dict[str, Any]) -> None:
        """Append one row (must have step and loss)."""
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        new = not self.csv.is_file()
        with open(self.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def plot(self) -> Path | None:
        """Training (and validation) loss against step, as out/loss.png; None without matplotlib."""
        if not self.enabled:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            warnings.warn("matplotlib is not installed: no loss.png (pip install matplotlib)", stacklevel=2)
            return None
        rows = self.rows()
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train", lw=1)
        val = [r for r in rows if r.get("val_loss") is not None]
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.png, dpi=120)
        plt.close(fig)
        return self.png
