"""The figures of each analysis, built from its JSON payload (so the CLI's PNGs and the HTML
report show the same numbers as ``results.json``)."""

from __future__ import annotations

from lmscope.reports.figures import Figure


def site_label(name: str) -> str:
    """Short axis label of a residual site: ``emb`` (entering layer 0), the layer index of a
    ``resid_post``, ``norm`` for the final norm, else the name itself."""
    if name == "blocks.0.resid_pre":
        return "emb"
    if name == "final_norm":
        return "norm"
    if name.endswith(".resid_post"):
        return name.split(".")[1]
    return name


def outlier_figures(summary: dict) -> list[Figure]:
    """Per-site OSP kurtosis curve, max and median |x| per site, and max |x| per site and channel,
    over the residual stream (other measured sites are in the summary's tables only)."""
    sites = {name: s for name, s in summary["sites"].items() if site_label(name) != name}
    labels = [site_label(name) for name in sites]
    xlabel = "hidden state (emb = embedding output, L = output of layer L, norm = final norm)"
    return [
        Figure(
            "kurtosis",
            "lines",
            f"OSP excess kurtosis per hidden state ({summary['protocol']}; mean {summary['osp_kurtosis']:.1f})",
            xlabel,
            "excess kurtosis",
            x=labels,
            series={"OSP kurtosis": [s["osp_kurtosis"] for s in sites.values()]},
        ),
        Figure(
            "max_abs",
            "lines",
            "max |x| and median |x| per hidden state",
            xlabel,
            "|x|",
            x=labels,
            series={
                "max |x|": [s["max_abs"] for s in sites.values()],
                "median |x|": [s["median_abs"] for s in sites.values()],
            },
            log=True,
        ),
        Figure(
            "max_abs_channels",
            "heatmap",
            "max |x| per hidden state and channel",
            "channel",
            "hidden state",
            x=list(range(len(next(iter(sites.values()))["absmax_per_channel"]))),
            y=labels,
            z=[s["absmax_per_channel"] for s in sites.values()],
            log=True,
            value_label="max |x|",
        ),
    ]


def kv_figures(kv: dict, weights: dict) -> list[Figure]:
    """K vs V norms per layer (activations and weights)."""
    keys, values = kv["keys"], kv["values"]
    layers = list(range(len(keys["frobenius"])))
    return [
        Figure(
            "kv_norms",
            "lines",
            f"key vs value norms per layer ({kv['n_tokens']} tokens)",
            "layer",
            "norm",
            x=layers,
            series={
                "|K|_F": keys["frobenius"],
                "|V|_F": values["frobenius"],
                "|K|_2 (spectral)": keys["spectral"],
                "|V|_2 (spectral)": values["spectral"],
            },
            log=True,
        ),
        Figure(
            "kv_weight_norms",
            "lines",
            "W_k vs W_v norms per layer",
            "layer",
            "norm",
            x=layers,
            series={
                "|W_k|_F": weights["k"]["frobenius"],
                "|W_v|_F": weights["v"]["frobenius"],
                "|W_k|_2": weights["k"]["spectral"],
                "|W_v|_2": weights["v"]["spectral"],
            },
        ),
    ]


def quant_figures(rows: list[dict]) -> list[Figure]:
    """Perplexity per quantisation config."""
    return [
        Figure(
            "quant_perplexity",
            "bars",
            "perplexity under simulated quantisation",
            "configuration",
            "perplexity",
            x=[r["config"] for r in rows],
            series={"perplexity": [r["perplexity"] for r in rows]},
            log=True,
        )
    ]


def head_figures(scores: dict[str, list[list[float]]]) -> list[Figure]:
    """One layer x head heatmap per head role (mean attention to the role's target token)."""
    titles = {
        "induction": "induction score (attention to the token after the previous occurrence)",
        "previous_token": "previous-token score (attention to the previous token)",
        "duplicate_token": "duplicate-token score (attention to the previous occurrence)",
    }
    return [
        Figure(
            f"heads_{role}",
            "heatmap",
            titles[role],
            "head",
            "layer",
            z=grid,
            x=list(range(len(grid[0]))),
            y=list(range(len(grid))),
            value_label="score",
        )
        for role, grid in scores.items()
    ]


def patching_figure(scores: list[list[float]], n_pairs: int) -> Figure:
    """Exact head patching scores on IOI as a layer x head heatmap (diverging around 0)."""
    return Figure(
        "circuit_ioi_heads",
        "heatmap",
        f"IOI: activation patching of each head's output (denoising, {n_pairs} pairs)",
        "head",
        "layer",
        z=scores,
        x=list(range(len(scores[0]))),
        y=list(range(len(scores))),
        diverging=True,
        value_label="normalised logit difference",
    )
