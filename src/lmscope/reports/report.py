"""The scan's HTML report: the figures and tables of :mod:`lmscope.scan` in one self-contained page."""

from __future__ import annotations

from pathlib import Path

from lmscope.reports.html import Report

_PARTS = {
    "model": ("Model", "What was loaded."),
    "outliers": (
        "Activation outliers",
        (
            "Excess kurtosis of each hidden state over its channels, as Outlier-Safe Pre-Training computes it "
            "(per token, mean(x^4)/std(x)^4 - 3 clamped at 0, averaged over tokens), on running WikiText-2 text. "
            "Massive activations (Sun et al. 2024): |x| > 100 and > 1000 x the median |x| of the hidden state."
        ),
    ),
    "kv": (
        "Keys and values",
        (
            "Norms of the cached keys (after the rotary embedding) and values over WikiText-2 tokens, of W_k and "
            "W_v, and perplexity with the KV cache fake-quantised. KV-AdaQuant: keys have larger norms than values "
            "and need more bits."
        ),
    ),
    "heads": (
        "Attention heads",
        (
            "Mean attention of each head on repeated random token sequences (R R) to the token an induction, "
            "previous-token or duplicate-token head attends to."
        ),
    ),
    "circuit": (
        "A circuit: indirect object identification",
        (
            "Exact activation patching of every head's output from the clean into the corrupted run "
            "(denoising); 1 = restores the clean logit difference, 0 = no effect."
        ),
    ),
}


def write_report(result, path: str | Path) -> Path:
    """Write the report of a (possibly partial) :class:`lmscope.scan.ScanResult`."""
    payload = result.payload
    parts = payload["parts"]
    report = Report(f"lmscope scan: {payload['model_name']}", subtitle=_subtitle(payload))
    for part, data in parts.items():
        title, text = _PARTS[part]
        seconds = payload["timings"].get(part)
        report.section(title, f"{text} ({seconds:.1f} s)" if seconds is not None else text)
        _tables(report, part, data)
        for figure in result.figures.get(part, []):
            report.figure(figure.plotly(), caption=f"{figure.name}.png")
    report.section("Settings, versions and timings")
    report.table([{"setting": k, "value": str(v)} for k, v in payload["settings"].items()], caption="settings")
    report.table([{"package": k, "version": v} for k, v in payload["versions"].items()], caption="versions")
    timings = [{"part": k, "seconds": v} for k, v in payload["timings"].items()]
    report.table(timings + [{"part": "total", "seconds": sum(payload["timings"].values())}], caption="time per part")
    return report.write(path)


def _subtitle(payload: dict) -> str:
    done = len(payload["parts"])
    status = "complete" if done == len(_PARTS) else f"partial: {done} of {len(_PARTS)} parts finished"
    return f"{status}; lmscope {payload['versions'].get('lmscope', '')}"


def _tables(report: Report, part: str, data: dict) -> None:
    if part == "model":
        report.table([{"property": k, "value": str(v)} for k, v in data.items()])
    elif part == "outliers":
        report.paragraph(
            f"Mean OSP excess kurtosis over the hidden states: {data['osp_kurtosis']:.2f} ({data['n_tokens']} tokens)."
        )
        rows = [
            {
                "hidden state": row["site"],
                "channel": row["channel"],
                "max |x|": row["max_abs"],
                "x median": row["ratio"],
                "tokens": ", ".join(repr(t["text"]) for t in row["tokens"]),
            }
            for row in data["massive"]
        ]
        report.table(rows or [{"massive activations": "none"}], caption="massive activations")
    elif part == "kv":
        rows = [
            {
                "config": r["config"],
                "K bits": r["k_bits"] if r["k_bits"] is not None else "fp",
                "V bits": r["v_bits"] if r["v_bits"] is not None else "fp",
                "perplexity": r["perplexity"],
                "change": r["delta_perplexity"],
                "seconds": r["seconds"],
            }
            for r in data["quant"]
        ]
        report.table(rows, caption=f"KV quantisation: {data['quant_protocol']}")
    elif part == "heads":
        loss = data["repeated_loss"]
        report.paragraph(
            f"Next-token loss on repeated random tokens: {loss['first_half']:.2f} nats on the first half, "
            f"{loss['second_half']:.2f} on the repeat."
        )
        rows = [
            {"role": role, "top heads": ", ".join(f"{layer}.{head} ({score:.2f})" for layer, head, score in top)}
            for role, top in data["top"].items()
        ]
        report.table(rows, caption="top heads (layer.head)")
    elif part == "circuit":
        report.paragraph(
            f"{data['n_pairs']} IOI pairs; logit difference clean {data['clean']:.3f}, corrupted {data['corrupt']:.3f}."
        )
        report.table(data["top"], caption="top heads by |score|")
