"""The merge audit shown: its lines in the human report and its chart (--plot)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from merge_tools.common.errors import CliError
from merge_tools.gate.audit import CONFLICTING, NEAR_DUPLICATE

if TYPE_CHECKING:
    from merge_tools.gate.audit import MergeAudit


def short_names(names: Sequence[str]) -> dict[str, str]:
    """Chart labels: each name's last path component, or as many as tell the names apart."""
    for depth in range(1, 8):
        short = {name: "/".join(name.rstrip("/").split("/")[-depth:]) for name in names}
        if len(set(short.values())) == len(set(names)):
            return short
    return {name: name for name in names}


def render_audit(audit: MergeAudit) -> list[str]:
    """The audit as the human report shows it."""
    width = max(len(m.model) for m in audit.models)
    read = f"{audit.bytes_read / 1e9:.2f} GB" if audit.bytes_read >= 1e9 else f"{audit.bytes_read / 1e6:.1f} MB"
    lines = ["", f"audit  against {audit.reference} ({read} of weights read)"]
    lines.append(f"  {'model':<{width}}  {'weight':>6}  {'task vector':>11}  {'relative':>8}  {'share':>6}  most moved tensor (relative)")
    for m in audit.models:
        share = f"{m.share:.1%}" if m.share is not None else "base"
        weight = f"{m.weight:.3g}" if m.weight is not None else "-"
        relative = m.top_tensors[0][2] if m.top_tensors else None
        top = f"{m.top_tensors[0][0]} ({'-' if relative is None else f'{relative:.3g}'})" if m.top_tensors else "-"
        lines.append(f"  {m.model:<{width}}  {weight:>6}  {m.task_vector_norm:>11.4g}  {m.relative_norm:>8.4f}  {share:>6}  {top}")
    shown = [p for p in audit.pairs if len(audit.pairs) <= 10 or not CONFLICTING < p[2] < NEAR_DUPLICATE]
    lines += [f"  cosine  {a}  ~  {b}: {c:+.3f}" for a, b, c in shown]
    if len(shown) < len(audit.pairs):
        lines.append(f"  ({len(audit.pairs) - len(shown)} more pairs between {CONFLICTING} and {NEAR_DUPLICATE}: see --json)")
    lines += [f"  note  {flag}" for flag in (*audit.notes, *audit.flags)]
    lines += [f"  FAIL  {problem}" for problem in audit.problems]
    if audit.skipped:
        lines.append(f"  {len(audit.skipped)} tensor(s) not compared, e.g. {audit.skipped[0]}")
    return lines


def write_audit_plot(audit: MergeAudit, path: Path) -> None:
    """Share per model (bars) and the per-layer task-vector norms (a heatmap, models by
    layers), labelled with the model names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    voiced = [m for m in audit.models if m.share is not None]
    short = short_names([m.model for m in audit.models] + [audit.reference])
    labels = [short[m.model] for m in voiced]
    figure, (bars, heat) = plt.subplots(1, 2, figsize=(14, 1.5 + 0.5 * len(voiced)), gridspec_kw={"width_ratios": [1, 2]})
    shares = [100 * (m.share or 0) for m in voiced]
    bars.barh(labels, shares, color="tab:blue")
    for row, share in enumerate(shares):
        bars.annotate(f"{share:.1f} %", (share, row), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    bars.invert_yaxis()
    bars.set_xlim(0, max(shares, default=0) * 1.2 or 1)
    bars.set_xlabel("share of the merge (%)")
    bars.set_title(f"share: weight x task vector, against {short[audit.reference]}")
    layers = max((len(m.layers) for m in voiced), default=0)
    grid = [list(m.layers) + [0.0] * (layers - len(m.layers)) for m in voiced]
    image = heat.imshow(grid, aspect="auto", cmap="viridis")
    heat.set_yticks(range(len(voiced)), labels=labels)
    heat.set_xlabel("decoder layer")
    heat.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    heat.set_title("task-vector norm per layer")
    figure.colorbar(image, ax=heat, label="||model - reference||")
    figure.tight_layout()
    chart = io.BytesIO()
    try:
        figure.savefig(chart, dpi=110, format=path.suffix.lower().lstrip("."))
    finally:
        plt.close(figure)
    try:
        with path.open("wb") as handle:  # written here, where a full disk is an error (savefig to a path hides some)
            handle.write(chart.getvalue())
    except OSError as exc:
        raise CliError(f"--plot {path}: cannot write it ({exc.strerror})") from exc
