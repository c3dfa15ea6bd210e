"""Heatmaps of the layer-by-layer similarity matrices (matplotlib, no display needed)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from epas_lightning.analysis.report import MEASURES, SIGNALS, Recommendation, RedundancyReport

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SIGNAL_TITLES = {"q": "post-RoPE Q", "k": "post-RoPE K", "v": "V", "attn": "attention probabilities"}


def similarity_figure(report: RedundancyReport, recommendation: Recommendation | None = None) -> Figure:
    """One heatmap per signal (rows) and measure (columns); the recommended source column is outlined."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    L = report.n_layer
    fig = Figure(figsize=(4.2 * len(MEASURES), 3.6 * len(SIGNALS)), layout="constrained")
    axes = fig.subplots(len(SIGNALS), len(MEASURES), squeeze=False)
    for row, signal in enumerate(SIGNALS):
        for col, measure in enumerate(MEASURES):
            ax = axes[row][col]
            matrix = report.matrices[f"{signal}/{measure}"].numpy()
            image = ax.imshow(matrix, vmin=min(0.0, float(matrix.min())), vmax=1.0, cmap="viridis", origin="upper")
            fig.colorbar(image, ax=ax, shrink=0.8)
            ax.set_title(f"{SIGNAL_TITLES[signal]}: {measure}", fontsize=10)
            ax.set_xlabel("layer")
            ax.set_ylabel("layer")
            ticks = range(0, L, max(1, L // 12))
            ax.set_xticks(list(ticks))
            ax.set_yticks(list(ticks))
            if L <= 12:
                for i in range(L):
                    for j in range(L):
                        color = "black" if matrix[i, j] > 0.6 else "white"
                        ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6, color=color)
            if recommendation is not None:  # rows start..L-1 of the source column: what the region would reuse
                src, start = recommendation.chosen.source, recommendation.start
                ax.add_patch(Rectangle((src - 0.5, start - 0.5), 1, L - start, fill=False, edgecolor="red", lw=1.5))
    title = f"Layer similarity over {report.n_tokens} tokens (seq {report.seq_len})"
    if recommendation is not None:
        title += f"; red: region {recommendation.start}..{L - 1} vs source {recommendation.chosen.source}"
    fig.suptitle(title, fontsize=11)
    return fig
