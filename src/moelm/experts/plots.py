"""The report's PNG plots, drawn with matplotlib (the `report` extra) off screen: the load heatmap (MoE layers x
experts), the per-layer balance lines, the co-activation of one layer, and with a comparison the load-share change."""
from __future__ import annotations

import io


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the experts report draws its plots with matplotlib: pip install 'moelm[report]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    fig.clf()
    return buf.getvalue()


def render(report: dict, coact_layer: int | None = None) -> dict[str, bytes]:
    """name -> PNG bytes. coact_layer: the decoder layer whose co-activation is drawn (default: the MoE layer of
    the largest CV)."""
    plt = _pyplot()
    layers = report["layers"]
    names = [x["layer"] for x in layers]
    if coact_layer is None:
        coact_layer = max(layers, key=lambda x: x["cv"])["layer"]
    if coact_layer not in names:
        raise ValueError(f"--coact-layer {coact_layer} is not an MoE layer of this model (those are {names})")
    out = {}
    e = report["num_experts"]
    tall = max(2.5, 0.22 * len(layers) + 1.2)

    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.16 * e), tall))
    im = ax.imshow([x["utilization"] for x in layers], aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(names)), [str(n) for n in names])
    fig.colorbar(im, ax=ax, label="load / fair share")
    out["load.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    k = report["top_k"]
    for key, label in (("cv", "CV of load"), ("dead_expert_frac", "dead experts (fraction)"),
                       ("expert_diversity", "exp(H) / N")):
        ax.plot(names, [x[key] for x in layers], marker="o", label=label)
    ax.plot(names, [x["adjacent_overlap"] / k for x in layers], marker="o",
            label=f"next token shares (of {k})")
    ax.set_xlabel("layer")
    ax.set_xticks(names)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    out["balance.png"] = _png(fig)
    plt.close(fig)

    x = next(x for x in layers if x["layer"] == coact_layer)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    coact = x["coactivation"]
    given = [[coact[i][j] / coact[i][i] if coact[i][i] and i != j else float("nan") for j in range(e)]
             for i in range(e)]  # the diagonal (1, or nothing for a dead expert) left blank
    im = ax.imshow(given, cmap="magma", interpolation="nearest", vmin=0, vmax=1)
    ax.set_title(f"layer {coact_layer}: P(expert j | expert i chosen)", fontsize="medium")
    ax.set_xlabel("j")
    ax.set_ylabel("i")
    fig.colorbar(im, ax=ax)
    out["coactivation.png"] = _png(fig)
    plt.close(fig)

    if "compare" in report:
        change = [c["load_share_change"] for c in report["compare"]["layers"]]
        top = max((abs(v) for row in change for v in row), default=0.0) or 1.0
        fig, ax = plt.subplots(figsize=(min(14, 3 + 0.16 * e), tall))
        im = ax.imshow(change, aspect="auto", cmap="coolwarm", vmin=-top, vmax=top, interpolation="nearest")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(names)), [str(n) for n in names])
        fig.colorbar(im, ax=ax, label=f"load share: this - {report['compare']['other']}"[:60])
        out["compare.png"] = _png(fig)
        plt.close(fig)
    return out
