"""Readable tables for the JSON reports of ``mambastep cost`` and ``mambastep compare``."""

from __future__ import annotations

from mambastep.families.accounting import PRIMITIVES


def si(value: float | None, unit: str = "") -> str:
    """1234567 -> '1.23 M'; None -> '-'."""
    if value is None:
        return "-"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def num(value: float | None) -> str:
    """3 significant digits, whole numbers from 1000 up; None -> '-'."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def table(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Numbers right-aligned; the first ``left`` columns (names) left-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for r in [headers, *rows]:
        cells = [str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells))
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _hardware_line(hw: dict) -> str:
    peaks = ", ".join(f"{k} {si(v, 'FLOP/s')}" for k, v in hw["peak"].items())
    chip = f", on-chip {si(hw['on_chip_bytes'], 'B')}" if hw["on_chip_bytes"] else ""
    return f"hardware {hw['name']} ({hw['dtype']}): {si(hw['bandwidth'], 'B/s')}{chip}; {peaks}"


def cost_table(report: dict) -> str:
    """Summary per (model, batch, context), then decode FLOPs and time by primitive."""
    summary, flops, time_share = [], [], []
    for m in report["models"]:
        for p in m["points"]:
            d, f = p["decode"], p["prefill"]
            key = [m["model"], str(p["batch"]), str(p["context"])]
            summary.append(
                key
                + [
                    si(d["total_flops_per_token"], "FLOP"),
                    si(d["total_bytes_per_token"], "B"),
                    num(d["arithmetic_intensity"]),
                    num(1e3 * d["predicted_s"]),
                    si(f["total_flops_per_token"], "FLOP"),
                    num(1e3 * f["predicted_s"]),
                    si(p["state_bytes"], "B"),
                    {True: "yes", False: "NO", None: "?"}[p["fits_in_memory"]],
                    str(p["kv_reads_exceed_weight_reads_at"] or "-"),
                ]
            )
            flops.append(key + [si(d["flops_per_token"][k]) for k in PRIMITIVES[:-1]])
            total = d["predicted_s"]
            time_share.append(key + [f"{100 * d['seconds_by_primitive'][k] / total:.1f}" for k in PRIMITIVES])
    key = ["model", "batch", "context"]
    return "\n\n".join(
        [
            _hardware_line(report["hardware"]),
            table(
                key
                + [
                    "decode FLOP/tok",
                    "bytes/tok",
                    "FLOP/B",
                    "ms/step",
                    "prefill FLOP/tok",
                    "prefill ms",
                    "state",
                    "fits",
                    "KV reads > weights at",
                ],
                summary,
            ),
            "decode FLOPs per token by primitive\n" + table(key + list(PRIMITIVES[:-1]), flops),
            "decode roofline time by primitive (%)\n" + table(key + list(PRIMITIVES), time_share),
        ]
    )


def compare_table(report: dict) -> str:
    """One row per (model, context), then the transformer/SSM ratios and where they cross 1."""
    rows = [
        [
            r["model"],
            r["skipped"] or "",
            str(r["context"]),
            num(r["ttft_s"]),
            num(r["ttft_predicted_s"]),
            num(r["decode_ms_per_token"]),
            num(r["decode_ms_predicted"]),
            si(r["state_bytes"], "B"),
            si(r["peak_rss_extra_bytes"], "B"),
            str(r["max_batch_in_budget"]),
        ]
        for r in report["rows"]
    ]
    crossings = [
        [
            f"{c['transformer']} / {c['ssm']}",
            c["metric"],
            " ".join(f"{ctx}:{ratio:.3g}" for ctx, ratio in c["ratios"].items()),
            "-" if c["crosses_at_context"] is None else f"{c['crosses_at_context']:,.0f}",
        ]
        for c in report["crossings"]
    ]
    machine = report["machine"]
    return "\n\n".join(
        [
            f"{machine['threads']} threads, torch {machine['torch']}; predictions: "
            + _hardware_line(machine["hardware"]),
            table(
                [
                    "model",
                    "skipped",
                    "context",
                    "TTFT s",
                    "predicted",
                    "decode ms/tok",
                    "predicted",
                    "state",
                    "peak RSS +",
                    "max batch",
                ],
                rows,
                left=2,
            ),
            "transformer / SSM ratios by context (> 1: the transformer costs more)\n"
            + table(["pair", "metric", "ratio at context", "crosses 1 at"], crossings, left=2),
        ]
    )
