"""The run's record: log.json (the curve and the run's facts) and curve.png."""

from __future__ import annotations

import gzip
import json
import lzma
import math
from pathlib import Path
from typing import Any

LOG_FILE = "log.json"
PLOT_FILE = "curve.png"


def bits_per_byte(nll_nats: float, tokens: int, bytes_per_token: float) -> float:
    """Summed negative log-likelihood (nats) over ``tokens`` predictions, in bits per byte of text."""
    return nll_nats / math.log(2) / (tokens * bytes_per_token)


def compressor_baselines(data: bytes) -> dict[str, float]:
    """Bits per byte of ``data`` compressed by gzip -9 and xz -9 (Python's gzip and lzma modules)."""
    if not data:
        return {}
    return {
        "gzip -9": 8 * len(gzip.compress(data, compresslevel=9, mtime=0)) / len(data),
        "xz -9": 8 * len(lzma.compress(data, preset=9)) / len(data),
    }


class RunLog:
    """The curve of a run, kept in memory and written to ``out/log.json`` (rank 0 only)."""

    def __init__(self, out: Path, header: dict[str, Any], previous: dict[str, Any] | None = None, since: int = 0):
        """``previous``: the log of the run being resumed; its entries after step ``since`` are dropped."""
        self.path = out / LOG_FILE
        self.record: dict[str, Any] = {**header, "train": [], "eval": []}
        if previous is not None:
            for key in ("train", "eval"):
                self.record[key] = [e for e in previous.get(key, []) if e["step"] <= since]

    @staticmethod
    def read(out: Path) -> dict[str, Any] | None:
        path = out / LOG_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def add(self, kind: str, entry: dict[str, Any]) -> None:
        self.record[kind].append(entry)

    def set(self, key: str, value: Any) -> None:
        self.record[key] = value

    def write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.record, indent=1) + "\n")
        tmp.replace(self.path)

    def plot(self) -> Path:
        """curve.png: training loss and held-out bits per byte against tokens seen."""
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
        import matplotlib.ticker

        fig, ax = plt.subplots(figsize=(7, 4.2))
        train, evals = self.record["train"], self.record["eval"]
        if train:
            ax.plot([e["tokens"] for e in train], [e["bits_per_byte"] for e in train], lw=1, label="train")
        if evals:
            ax.plot([e["tokens"] for e in evals], [e["bits_per_byte"] for e in evals], "o-", label="held-out")
        for i, (name, value) in enumerate(self.record.get("baselines", {}).items()):
            ax.axhline(value, ls="--", lw=1, color=f"C{i + 2}", label=f"{name} (held-out)")
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("bits per byte")
        ax.set_yscale("log")  # the first steps sit far above the rest
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_title(self.record.get("title", "training curve"))
        ax.grid(alpha=0.3)
        ax.legend()
        path = self.path.with_name(PLOT_FILE)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
