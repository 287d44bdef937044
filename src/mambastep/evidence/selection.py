"""What a selective state space model remembers and forgets: Δ and the state norm per token.

The Mamba paper (arXiv 2312.00752, section 3) explains selection through the
step size Δ: with h_t = exp(Δ A) h_{t-1} + Δ B x_t, a large Δ resets the state
and takes in the current input, a small Δ keeps the state and passes the input
over. ``trace_selection`` runs an input through a model one token at a time and
records, per layer, Δ after its softplus (read by a forward hook on each
mixer's ``dt_probe``) and the norm of the SSM state after each token;
``plot_selection`` draws the trace as one PNG and ``selection_summary`` reduces
it to a few numbers (mean Δ, and at highlighted against other positions).

Δ is averaged within channel groups: Mamba-1 and its time-invariant ablation
have one Δ per inner channel (e of them), split into ``groups`` contiguous
groups; Mamba-2 has one Δ per head, and every head is its own group.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mambastep.families import FAMILIES, family_named, family_of

PROGRESS_ABOVE = 256  # tokens: longer inputs get a progress bar
LABELLED_UP_TO = 120  # tokens: shorter inputs get one x tick label per token
CONSTANT_RTOL = 1e-6  # Δ whose spread over tokens is below this (relative) counts as time-invariant


@dataclass
class SelectionTrace:
    """Δ and the state norm of every layer after every token of one input.

    tokens: (l,) int64 token ids.
    dt: per layer, (l, groups) float32: Δ (after softplus) averaged within each channel group.
    state_norm: (layers, l) float32: Frobenius norm of the layer's SSM state after each token.
    family: the model family ("mamba", "mamba2", "mamba_lti").
    group_bounds: per layer, the channel range [start, stop) of each group (Mamba-2: each head).
    labels: the token strings, for the plot's ticks (None: the ids are shown).
    """

    tokens: Tensor
    dt: list[Tensor]
    state_norm: Tensor
    family: str
    group_bounds: list[list[tuple[int, int]]] | None = None
    labels: list[str] | None = None

    @property
    def n_layers(self) -> int:
        return len(self.dt)

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])


def _dt_probes(model) -> list:
    """Every layer's ``dt_probe``; ValueError for a family without Δ (the transformer)."""
    if family_of(model.config).delta is None:
        selective = ", ".join(name for name, family in FAMILIES.items() if family.delta is not None)
        raise ValueError(f"inspect needs a state space model ({selective}), got {model.config.family}")
    return [block.mixer.dt_probe for block in model.backbone.layers]


def _group_bounds(width: int, groups: int) -> list[tuple[int, int]]:
    """``groups`` contiguous channel ranges covering [0, width), sizes differing by at most one."""
    edges = [round(i * width / groups) for i in range(groups + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _group_mean(dt: Tensor, bounds: list[tuple[int, int]]) -> Tensor:
    """(..., width) -> (..., groups): the mean of each channel range."""
    if all(stop - start == bounds[0][1] - bounds[0][0] for start, stop in bounds):
        return dt.unflatten(-1, (len(bounds), -1)).mean(-1)
    return torch.stack([dt[..., start:stop].mean(-1) for start, stop in bounds], dim=-1)


def as_token_ids(tokens: Tensor | Sequence[int], vocab_size: int) -> Tensor:
    """One sequence of token ids as an int64 tensor (l,); ValueError if empty, not integers, or out of range."""
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 1:
        raise ValueError(f"inspect takes one sequence of token ids (1-D), got shape {tuple(tokens.shape)}")
    if tokens.numel() == 0:
        raise ValueError("empty input: there are no tokens to inspect")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"token ids must be integers, got {tokens.dtype}")
    bad = tokens[(tokens < 0) | (tokens >= vocab_size)]
    if bad.numel():
        raise ValueError(f"token id {int(bad[0])} is outside the model's vocabulary [0, {vocab_size})")
    return tokens.to(torch.int64)


@torch.no_grad()
def trace_selection(model, tokens: Tensor | Sequence[int], groups: int = 16, progress: bool = True) -> SelectionTrace:
    """Run ``tokens`` through ``model`` one step at a time and record Δ and the state norm.

    The steps start from ``model.new_state(1)``: the recurrence is exact and its
    memory constant, whatever the length. A forward hook on every layer's
    ``dt_probe`` reads Δ; the hooks are removed when this returns or raises.

    Args:
        model: a mambastep SSM language model (families mamba, mamba2, mamba_lti).
        tokens: (l,) token ids.
        groups: channel groups per layer for Mamba-1 and mamba_lti (at most the
            channel count); Mamba-2 always has one group per head.
        progress: a progress bar (stderr) for inputs longer than a few hundred tokens.

    Raises:
        ValueError: a model without ``dt_probe`` (the transformer), an empty
            input, a token id outside the vocabulary, or ``groups`` < 1.
    """
    from tqdm import tqdm

    probes = _dt_probes(model)
    per_head = family_of(model.config).delta == "head"
    tokens = as_token_ids(tokens, model.config.vocab_size)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups!r}")

    bounds: list[list[tuple[int, int]] | None] = [None] * len(probes)
    collected: list[list[Tensor]] = [[] for _ in probes]

    def hook_for(i: int):
        def hook(module, inputs, output: Tensor) -> None:
            dt = output[0].float()  # (l, width): one token per step, so l == 1
            if bounds[i] is None:
                width = dt.shape[-1]
                bounds[i] = [(h, h + 1) for h in range(width)] if per_head else _group_bounds(width, min(groups, width))
            collected[i].append(_group_mean(dt, bounds[i]))

        return hook

    handles = [probe.register_forward_hook(hook_for(i)) for i, probe in enumerate(probes)]
    try:
        state = model.new_state(1)
        device = model.device
        norms = []
        for token in tqdm(
            tokens.tolist(),
            desc="inspect",
            unit="tok",
            leave=False,
            disable=not progress or len(tokens) <= PROGRESS_ABOVE,
        ):
            # One token through forward takes each mixer's recurrent step, always eagerly: hooks run.
            _, state = model(torch.tensor([[token]], device=device), state)
            norms.append(torch.stack([layer.ssm[0].float().norm() for layer in state.layers]))  # (layers,)
    finally:
        for handle in handles:
            handle.remove()
    dt = [torch.cat(steps).cpu() for steps in collected]  # (l, groups) per layer
    if any(d.shape[0] != len(tokens) for d in dt):
        raise RuntimeError("dt_probe did not run once per layer per token")  # a model change broke the probe
    return SelectionTrace(
        tokens=tokens.cpu(),
        dt=dt,
        state_norm=torch.stack(norms, dim=1).cpu(),
        family=model.config.family,
        group_bounds=bounds,
    )


def parse_ids(text: str, flag: str = "ids") -> list[int]:
    """Comma-separated token ids ("3,1,4"; spaces allowed) -> a list of ints.

    Raises:
        ValueError: a part that is not an integer; the message names ``flag``.
    """
    parts = [p for p in text.replace(" ", ",").split(",") if p]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integer token ids, e.g. 3,1,4; got {text!r}") from None


def labelled_input(
    tokens: Sequence[int], vocab_size: int, tokenizer=None, highlight_ids: Sequence[int] | None = None
) -> tuple[Tensor, list[str] | None, Tensor | None]:
    """What ``trace_selection`` and ``plot_selection`` take of an input: its token ids checked
    (``as_token_ids``), their labels (None without a tokenizer: the plot shows the ids), and
    the positions that hold one of ``highlight_ids`` ((l,) bool; None: none highlighted)."""
    tokens = as_token_ids(torch.tensor(list(tokens), dtype=torch.int64), vocab_size)
    labels = None if tokenizer is None else token_labels(tokenizer, tokens)
    highlight = (
        None if highlight_ids is None else torch.isin(tokens, torch.tensor(list(highlight_ids), dtype=torch.int64))
    )
    return tokens, labels, highlight


# ---------------------------------------------------------------------------------------------- labels


def escape_label(text: str) -> str:
    """A token's text made visible and safe as a matplotlib label: spaces as ␣, control
    characters as escapes (\\n, \\t, \\x00), $ escaped so it is not read as mathtext."""
    named = {"\n": "\\n", "\t": "\\t", "\r": "\\r", " ": "\u2423"}
    out = []
    for ch in text:
        if ch in named:
            out.append(named[ch])
        elif unicodedata.category(ch).startswith("C"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        elif ch == "$":
            out.append("\\$")
        else:
            out.append(ch)
    return "".join(out) or "\u2205"  # ∅: a token with no text


def token_labels(tokenizer, tokens: Sequence[int] | Tensor) -> list[str]:
    """One escaped label per token: its text alone, or ``\\xNN`` for a byte that is
    not a whole character (byte-level tokenizers); the id where decoding fails."""
    labels = []
    for token in torch.as_tensor(tokens).tolist():
        try:
            text = tokenizer.decode([token])
        except (ValueError, TypeError, OverflowError):
            labels.append(f"#{token}")
            continue
        if "\ufffd" in text:  # part of a character (one byte of a UTF-8 sequence)
            labels.append(
                f"\\x{token:02x}" if 0 <= token < 256 and getattr(tokenizer, "vocab_size", None) == 256 else f"#{token}"
            )
        else:
            labels.append(escape_label(text))
    return labels


# ---------------------------------------------------------------------------------------------- summary


def _is_constant_over_tokens(dt: Tensor) -> bool:
    """Whether Δ (l, groups) is the same at every token (a time-invariant layer); False
    for a single token, where nothing can be told."""
    if dt.shape[0] < 2:
        return False
    spread = (dt.max(0).values - dt.min(0).values).abs()
    return bool((spread <= CONSTANT_RTOL * dt.abs().max(0).values.clamp_min(1e-30)).all())


def _mean_or_none(values: Tensor) -> float | None:
    return float(values.double().mean()) if values.numel() else None


def selection_summary(trace: SelectionTrace, highlight: Tensor | None = None) -> dict:
    """JSON-able numbers of a trace.

    Per layer: ``mean_dt`` (over tokens and channel groups), ``log_dt_std_over_tokens``
    (the spread of log Δ along the input, averaged over groups: 0 for a time-invariant
    layer), ``time_invariant`` (Δ the same at every token; false for one token),
    ``final_state_norm``. With ``highlight`` ((l,) bool),
    also ``mean_dt_highlighted``, ``mean_dt_other`` and ``highlighted_over_other``
    (their ratio), per layer and over all layers (the mean of the layer means);
    null where a side has no positions.
    """
    mask = None if highlight is None else _check_highlight(highlight, trace.length)
    layers = []
    for i, dt in enumerate(trace.dt):
        log_dt = dt.double().clamp_min(1e-30).log()
        row = {
            "layer": i,
            "groups": int(dt.shape[1]),
            "mean_dt": float(dt.double().mean()),
            "log_dt_std_over_tokens": float(log_dt.std(0, unbiased=False).mean()),
            "time_invariant": _is_constant_over_tokens(dt),
            "final_state_norm": float(trace.state_norm[i, -1]),
        }
        if mask is not None:
            row.update(_split_means(dt, mask))
        layers.append(row)
    summary = {
        "family": trace.family,
        "tokens": trace.length,
        "layers": layers,
        "mean_dt": sum(r["mean_dt"] for r in layers) / len(layers),
    }
    if mask is not None:
        summary["highlighted_positions"] = int(mask.sum())
        high = [r["mean_dt_highlighted"] for r in layers]
        other = [r["mean_dt_other"] for r in layers]
        summary["mean_dt_highlighted"] = None if None in high else sum(high) / len(high)
        summary["mean_dt_other"] = None if None in other else sum(other) / len(other)
        summary["highlighted_over_other"] = _ratio(summary["mean_dt_highlighted"], summary["mean_dt_other"])
    return summary


def _split_means(dt: Tensor, mask: Tensor) -> dict:
    high, other = _mean_or_none(dt[mask]), _mean_or_none(dt[~mask])
    return {"mean_dt_highlighted": high, "mean_dt_other": other, "highlighted_over_other": _ratio(high, other)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _check_highlight(highlight: Tensor, length: int) -> Tensor:
    mask = torch.as_tensor(highlight).cpu()
    if mask.dtype != torch.bool or mask.shape != (length,):
        raise ValueError(f"highlight must be a boolean mask of shape ({length},), got {mask.dtype} {tuple(mask.shape)}")
    return mask


# ---------------------------------------------------------------------------------------------- plot


def _runs(mask: Tensor) -> list[tuple[int, int]]:
    """[start, stop) of each run of True in a 1-D mask."""
    padded = torch.cat([torch.zeros(1, dtype=torch.int8), mask.to(torch.int8), torch.zeros(1, dtype=torch.int8)])
    edges = torch.nonzero(padded.diff()).flatten().tolist()
    return list(zip(edges[0::2], edges[1::2]))


def _mark(ax, runs: list[tuple[int, int]], outline: bool) -> None:
    """Mark token runs [start, stop) over the full height of ``ax``: red outlines (on a
    heatmap) or light red bands. One collection per panel, so thousands of runs stay cheap."""
    from matplotlib.collections import PolyCollection

    if not runs:
        return
    boxes = [[(a - 0.5, 0), (a - 0.5, 1), (b - 0.5, 1), (b - 0.5, 0)] for a, b in runs]
    style = (
        dict(facecolor="none", edgecolor="red", linewidth=0.8)
        if outline
        else dict(facecolor="red", alpha=0.15, linewidth=0)
    )
    ax.add_collection(PolyCollection(boxes, transform=ax.get_xaxis_transform(), **style), autolim=False)


def plot_selection(
    trace: SelectionTrace,
    out: Path,
    labels: list[str] | None = None,
    highlight: Tensor | None = None,
    title: str | None = None,
) -> Path:
    """Write one PNG of a trace; returns its path.

    One heatmap per layer of log10 Δ (tokens along x, channel groups or heads along
    y; one colour scale for all layers), then the state norm of every layer against
    the token position (log scale). Up to 120 tokens every token is labelled with its text
    (``labels``, else ``trace.labels``, else the ids); longer inputs get sparse
    position ticks. ``highlight`` ((l,) bool) marks positions on every panel: outlined
    columns on the heatmaps, shaded bands below, red tick labels. A layer whose Δ is
    the same at every token (time-invariant) says so on its panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    length, n_layers = trace.length, trace.n_layers
    mask = None if highlight is None else _check_highlight(highlight, length)
    labels = labels if labels is not None else trace.labels
    if labels is not None and len(labels) != length:
        raise ValueError(f"labels must hold one string per token ({length}), got {len(labels)}")
    labelled = length <= LABELLED_UP_TO
    if labelled and labels is None:
        labels = [str(t) for t in trace.tokens.tolist()]

    log_dt = [d.float().clamp_min(1e-30).log10() for d in trace.dt]
    vmin = min(float(d.min()) for d in log_dt)
    vmax = max(float(d.max()) for d in log_dt)
    if vmax - vmin < 1e-6:  # one value everywhere: give the colour scale some width
        vmin, vmax = vmin - 0.5, vmax + 0.5

    width = min(max(10.0, 2.5 + 0.16 * length), 24.0) if labelled else 14.0
    label_room = 0.09 * max((len(s) for s in labels), default=1) if labelled else 0.0
    row = min(1.3, max(0.45, 18 / n_layers))  # inches per layer: deep models get thinner rows
    height = row * n_layers + 2.4 + label_room
    fig = plt.figure(figsize=(width, height), layout="constrained")
    grid = fig.add_gridspec(n_layers + 1, 2, width_ratios=[80, 1], height_ratios=[1.0] * n_layers + [1.7])
    norm_ax = fig.add_subplot(grid[n_layers, 0])
    heat_axes = [fig.add_subplot(grid[i, 0], sharex=norm_ax) for i in range(n_layers)]
    unit = "head" if family_named(trace.family).delta == "head" else "channel group"

    runs = [] if mask is None else _runs(mask)
    image = None
    for i, (ax, values) in enumerate(zip(heat_axes, log_dt)):
        groups = values.shape[1]
        image = ax.imshow(
            values.T.numpy(),
            aspect="auto",
            interpolation="nearest",
            origin="lower",
            cmap="viridis",
            vmin=vmin,
            vmax=vmax,
            extent=(-0.5, length - 0.5, -0.5, groups - 0.5),
        )
        ax.set_ylabel(f"layer {i}\n{unit}", fontsize=8 if row >= 0.8 else 6)
        ax.set_yticks(sorted({0, groups - 1}))
        ax.tick_params(axis="both", labelsize=7, labelbottom=False)
        if _is_constant_over_tokens(trace.dt[i]):
            ax.text(
                0.995,
                0.96,
                "time-invariant: Δ is the same at every token",
                transform=ax.transAxes,
                ha="right",
                va="top",
                fontsize=8,
                color="white",
                bbox=dict(facecolor="black", alpha=0.55, edgecolor="none", pad=2),
            )
        _mark(ax, runs, outline=True)
    colorbar = fig.colorbar(image, cax=fig.add_subplot(grid[:n_layers, 1]))
    colorbar.set_label("log10 Δ", fontsize=8)
    colorbar.ax.set_title("high:\ntake the\ntoken in", fontsize=7, loc="left")  # the meaning at each end,
    colorbar.ax.set_xlabel("low:\nkeep the\nstate", fontsize=7, loc="left")  # short enough for one layer's height
    colorbar.ax.tick_params(labelsize=7)

    positions = range(length)
    for i in range(n_layers):
        norm_ax.plot(
            positions,
            trace.state_norm[i].numpy(),
            linewidth=1.0,
            marker="." if length <= LABELLED_UP_TO else None,
            markersize=3,
            label=f"layer {i}",
        )
    _mark(norm_ax, runs, outline=False)
    norm_ax.set_xlim(-0.5, length - 0.5)
    norm_ax.set_yscale("log", nonpositive="mask")  # layers' norms differ by orders of magnitude
    norm_ax.set_ylabel("SSM state norm\n(Frobenius, log)", fontsize=8)
    norm_ax.grid(True, alpha=0.3)
    norm_ax.tick_params(axis="y", labelsize=7)
    legend_ax = fig.add_subplot(grid[n_layers, 1])  # beside the panel, below the colour bar: not over the lines
    legend_ax.axis("off")
    legend_ax.legend(
        *norm_ax.get_legend_handles_labels(),
        fontsize=7,
        ncol=math.ceil(n_layers / 12),
        loc="upper left",
        borderaxespad=0,
    )

    if labelled:
        norm_ax.set_xticks(list(positions))
        norm_ax.set_xticklabels(labels, rotation=90, fontsize=7, fontfamily="DejaVu Sans Mono")
        norm_ax.set_xlabel("token (position order, left to right)")
        heat_axes[0].tick_params(axis="x", labeltop=True, labelrotation=90)
        marks = mask.tolist() if mask is not None else [False] * length
        for below, above, marked in zip(norm_ax.xaxis.get_major_ticks(), heat_axes[0].xaxis.get_major_ticks(), marks):
            above.label2.set_fontfamily("DejaVu Sans Mono")
            if marked:
                below.label1.set_color("red")
                above.label2.set_color("red")
    else:
        norm_ax.set_xlabel("token position")
        norm_ax.tick_params(axis="x", labelsize=7)

    count = 0 if mask is None else int(mask.sum())
    marked = "" if mask is None else f"; red: {count} highlighted position{'s' * (count != 1)}"
    fig.suptitle(
        title
        or f"selection of a {trace.family} model over {length} tokens: Δ per token and {unit}, "
        f"and the state norm{marked}",
        fontsize=10,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


__all__ = ["SelectionTrace", "escape_label", "plot_selection", "selection_summary", "token_labels", "trace_selection"]
