"""PNG plots of a ``compare`` report: latency and memory against context, on log axes."""

from __future__ import annotations

from pathlib import Path


def _series(report: dict, model: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r["context"], r[key]) for r in report["rows"] if r["model"] == model and r[key] is not None]
    return [c for c, _ in points], [v for _, v in points]


def _panel(ax, report: dict, measured: str, predicted: str | None, ylabel: str, scale: float = 1.0) -> None:
    """Measured values as solid lines with filled circles, predictions as dashed lines with open
    squares in the same colour (the markers show a single context, where there is no line)."""
    for model in [m["model"] for m in report["models"]]:
        x, y = _series(report, model, measured)
        (line,) = ax.plot(x, [v * scale for v in y], marker="o", label=model)
        if predicted:
            px, py = _series(report, model, predicted)
            ax.plot(
                px,
                [v * scale for v in py],
                linestyle="--",
                marker="s",
                markerfacecolor="none",
                color=line.get_color(),
                alpha=0.6,
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)


def plot_compare(report: dict, out: Path) -> list[Path]:
    """Write latency.png and memory.png into ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    machine = report["machine"]
    where = f"{machine['threads']} threads, {report['settings']['dtype']}, batch {report['settings']['batch']}"
    fig, (ttft, decode) = plt.subplots(1, 2, figsize=(12, 4.5))
    _panel(ttft, report, "ttft_s", "ttft_predicted_s", "time to first token (s)")
    _panel(decode, report, "decode_ms_per_token", "decode_ms_predicted", "decode (ms per token)")
    ttft.legend()
    fig.suptitle(
        f"latency against context ({where}; dashed, open squares: roofline on '{machine['hardware']['name']}')"
    )
    fig.tight_layout()
    latency = out / "latency.png"
    fig.savefig(latency, dpi=120)
    plt.close(fig)

    fig, (state, batch) = plt.subplots(1, 2, figsize=(12, 4.5))
    _panel(state, report, "state_bytes", None, "state (MiB; dotted: measured peak RSS added)", 2**-20)
    for line, model in zip(state.get_lines(), [m["model"] for m in report["models"]]):
        # Below a MiB the allocator's reuse of freed pages hides what a measurement added.
        points = [(c, v) for c, v in zip(*_series(report, model, "peak_rss_extra_bytes")) if v >= 2**20]
        state.plot(
            [c for c, _ in points], [v * 2**-20 for _, v in points], linestyle=":", marker="x", color=line.get_color()
        )
    _panel(
        batch,
        report,
        "max_batch_in_budget",
        None,
        f"largest batch in {report['settings']['memory_budget'] / 2**30:.0f} GiB (weights + states)",
    )
    state.legend()
    fig.suptitle(f"memory against context ({where})")
    fig.tight_layout()
    memory = out / "memory.png"
    fig.savefig(memory, dpi=120)
    plt.close(fig)
    return [latency, memory]
