"""Reports of the serving benchmark (`quire bench serve`): per-rate statistics, the text
table, and the plots (matplotlib and numpy are imported only when used)."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quire.cluster.tools.bench_serve import RequestResult

METRICS = ("ttft", "tpot", "itl", "e2e")


def rate_label(rate: float) -> str | float:
    """How a rate appears in the report: JSON has no infinity."""
    return "inf" if math.isinf(rate) else rate


def rate_text(rate: float | str) -> str:
    return str(rate_label(rate) if isinstance(rate, float) else rate).removesuffix(".0")


def _stats_ms(values: list[float]) -> dict[str, float | None]:
    import numpy as np

    if not values:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    ms = np.asarray(values, dtype=float) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"mean": float(ms.mean()), "median": float(p50), "p90": float(p90), "p99": float(p99)}


def samples(results: list[RequestResult]) -> dict[str, list[float]]:
    """Each metric's samples in seconds over the completed requests (ITL: over all their tokens)."""
    done = [r for r in results if r.ok]
    return {"ttft": [r.ttft for r in done if r.ttft is not None],
            "tpot": [r.tpot for r in done if r.tpot is not None],
            "itl": [gap for r in done for gap in r.itl], "e2e": [r.e2e for r in done]}


def summarize(results: list[RequestResult], duration: float, expected_output: int,
              slo_ms: dict[str, float]) -> dict[str, Any]:
    """One rate's report entry; `slo_ms` maps ttft/tpot/e2e to limits (only those given)."""
    done = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    goodput = None
    if slo_ms:
        def meets(r: RequestResult) -> bool:
            return all(getattr(r, name) is None or getattr(r, name) * 1000.0 <= limit
                       for name, limit in slo_ms.items())
        goodput = per_s(sum(meets(r) for r in done))
    entry = {"completed": len(done), "failed": len(results) - len(done), "duration_s": duration,
             "request_throughput": per_s(len(done)), "output_throughput": per_s(output_tokens),
             "total_token_throughput": per_s(input_tokens + output_tokens), "goodput": goodput,
             "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
             "expected_output_tokens": expected_output,
             "errors": dict(Counter(r.error for r in results if not r.ok).most_common(5))}
    for name, values in samples(results).items():
        entry[f"{name}_ms"] = _stats_ms(values)
    return entry


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(report: dict[str, Any]) -> str:
    """The report as a compact text table: one column per request rate."""
    runs = report["results"]
    fields = [("completed", "completed", 0), ("failed", "failed", 0), ("duration (s)", "duration_s", 2),
              ("requests/s", "request_throughput", 2), ("output tokens/s", "output_throughput", 1),
              ("total tokens/s", "total_token_throughput", 1), ("goodput (req/s)", "goodput", 2)]
    rows = [("request rate (req/s)", [rate_text(r["request_rate"]) for r in runs])]
    rows += [(title, [_cell(r[key], digits) for r in runs]) for title, key, digits in fields]
    rows += [(f"{name.upper()} {stat} (ms)", [_cell(r[f"{name}_ms"][stat], 1) for r in runs])
             for name in METRICS for stat in ("mean", "median", "p90", "p99")]
    cfg = report["config"]
    head = (f"{cfg['backend']} {cfg['target']} model={cfg['model']} prompts={cfg['num_prompts']} "
            f"input={cfg['input_len']} output={cfg['output_len']}")
    width = max(len(name) for name, _ in rows)
    cols = [max(len(row[1][i]) for row in rows) for i in range(len(runs))]
    lines = [head] + [f"{name:<{width}}  " + "  ".join(v.rjust(c) for v, c in zip(values, cols))
                      for name, values in rows]
    for r in runs:
        for error, count in r["errors"].items():
            lines.append(f"rate {r['request_rate']}: {count} x {error}")
    return "\n".join(lines)


def plot(runs: list[tuple[float, list[RequestResult]]], report: dict[str, Any], plot_dir: Path) -> None:
    """latency_cdf.png (one line per rate) and, for two rates or more, rate_sweep.png."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    import numpy as np

    plot_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, name in zip(axes.flat, METRICS):
        for rate, results in runs:
            values = np.sort(np.asarray(samples(results)[name]) * 1000.0)
            if values.size:
                ax.step(values, np.arange(1, values.size + 1) / values.size, where="post",
                        label=f"{rate_text(rate)} req/s")
        # ITL has a long tail (a decode waiting behind another request's prefill): log scale shows both ends.
        ax.set(title=name.upper(), xlabel="ms", ylabel="fraction of samples", xscale="log" if name == "itl" else "linear")
        ax.grid(alpha=0.3)
        if ax.lines:  # every request failed: an empty panel, no legend
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(plot_dir / "latency_cdf.png", dpi=100)
    plt.close(fig)
    if len(runs) >= 2:
        finite = [rate for rate, _ in runs if not math.isinf(rate)]
        # inf has no place on the axis: put it to the right of every finite rate and label it.
        inf_x = max(finite) * 1.5 if finite else 1.0
        xs = [inf_x if math.isinf(rate) else rate for rate, _ in runs]
        order = np.argsort(xs)
        x = np.asarray(xs)[order]
        entries = [report["results"][i] for i in order]
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        left.plot(x, [e["output_throughput"] for e in entries], marker="o")
        left.set(title="output throughput", xlabel="request rate (req/s)", ylabel="tokens/s")
        for name in ("ttft", "tpot", "e2e"):
            for stat, style in (("median", "-"), ("p99", "--")):
                ys = [e[f"{name}_ms"][stat] for e in entries]
                right.plot(x, [np.nan if y is None else y for y in ys], style, marker="o",
                           label=f"{name.upper()} {'p50' if stat == 'median' else stat}")
        right.set(title="latency", xlabel="request rate (req/s)", ylabel="ms", yscale="log")
        right.legend(fontsize="small")
        for ax in (left, right):
            ax.set_xticks(x, [rate_text(runs[i][0]) for i in order])
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(plot_dir / "rate_sweep.png", dpi=100)
        plt.close(fig)
