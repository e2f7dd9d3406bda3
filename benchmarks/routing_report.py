"""The routing benchmark's report (`routing.py` runs the parts and documents the goals): the
goals checked against a report, the printed summary and the chart.
"""
from __future__ import annotations

from pathlib import Path

from quire.cluster.serving.routing import POLICIES

GOAL_PREFILL_RATIO = 0.5         # cache_aware prefill tokens / round_robin's, at most
GOAL_ORACLE_SHARE = 0.95         # cache_aware hit rate / the oracle's, at least ("within 5%")
GOAL_DECISIONS_PER_S = 5000.0    # at 64 replicas, 1k-token prompts
GOAL_REPLICAS = 64


def check_goals(report: dict) -> dict:
    goals: dict = {}
    dp = report.get("dp2", {}).get("results", {})
    if "cache_aware" in dp and "round_robin" in dp:
        ratio = dp["cache_aware"]["prefill_tokens"] / max(dp["round_robin"]["prefill_tokens"], 1)
        goals["dp2_prefill_ratio_cache_aware_over_round_robin"] = {
            "value": ratio, "goal": f"<= {GOAL_PREFILL_RATIO}", "met": ratio <= GOAL_PREFILL_RATIO}
    if "cache_aware" in dp:
        share = dp["cache_aware"]["hit_rate_vs_oracle"]
        goals["dp2_cache_aware_hit_rate_vs_oracle"] = {
            "value": share, "goal": f">= {GOAL_ORACLE_SHARE}", "met": share is not None and share >= GOAL_ORACLE_SHARE}
    sim = report.get("simulated", {})
    if sim:
        shares = {n: rows["cache_aware"]["hit_rate_vs_oracle"] for n, rows in sim["runs"].items() if "cache_aware" in rows}
        if shares:
            goals["sim_cache_aware_hit_rate_vs_oracle"] = {
                "value": shares, "goal": f">= {GOAL_ORACLE_SHARE} at every N",
                "met": all(v is not None and v >= GOAL_ORACLE_SHARE for v in shares.values())}
        ratios = {n: rows["cache_aware"]["prefill_tokens"] / max(rows["round_robin"]["prefill_tokens"], 1)
                  for n, rows in sim["runs"].items() if "cache_aware" in rows and "round_robin" in rows and n != "1"}
        if ratios:
            goals["sim_prefill_ratio_cache_aware_over_round_robin"] = {
                "value": ratios, "goal": f"<= {GOAL_PREFILL_RATIO} at every N > 1",
                "met": all(v <= GOAL_PREFILL_RATIO for v in ratios.values())}
        top = sim["decision_1k"].get(str(GOAL_REPLICAS), {}).get("cache_aware")
        if top is not None:
            goals[f"decisions_per_s_1k_prompts_{GOAL_REPLICAS}_replicas"] = {
                "value": top["decisions_per_s"], "goal": f">= {GOAL_DECISIONS_PER_S:.0f} (cache_aware)",
                "met": top["decisions_per_s"] >= GOAL_DECISIONS_PER_S}
        else:
            goals[f"decisions_per_s_1k_prompts_{GOAL_REPLICAS}_replicas"] = {
                "value": None, "goal": f">= {GOAL_DECISIONS_PER_S:.0f}", "met": None,
                "note": f"not measured: {GOAL_REPLICAS} replicas not in --replicas"}
    return goals


def format_summary(report: dict) -> str:
    lines = []
    sim = report.get("simulated")
    if sim:
        lines.append("simulated: hit rate (oracle) | prefill tokens | decisions/s in run | "
                     f"decisions/s {report['config']['decision_prompt_len']}-token prompts (us hash + choose)")
        for n, rows in sim["runs"].items():
            for name, row in rows.items():
                bench = sim["decision_1k"][n][name]
                lines.append(f"  N={n:>2} {name:<13} {row['hit_rate']:6.1%} ({row['oracle_hit_rate']:6.1%}) "
                             f"{row['prefill_tokens']:>10,} {row['decisions_per_s']:>10,.0f} {bench['decisions_per_s']:>10,.0f} "
                             f"({bench['hash_us_per_decision']:.0f} + {bench['choose_us_per_decision']:.0f})")
    dp = report.get("dp2")
    if dp and "results" in dp:
        lines.append("dp2 (tiny model, CPU): hit rate (oracle) | prefill tokens | TTFT mean / p50 / p90 s | output tok/s")
        for name, row in dp["results"].items():
            lines.append(f"  {name:<13} {row['hit_rate']:6.1%} ({row['oracle_hit_rate']:6.1%}) {row['prefill_tokens']:>9,} "
                         f"{row['ttft_s_mean']:.3f} / {row['ttft_s_p50']:.3f} / {row['ttft_s_p90']:.3f} "
                         f"{row['output_tokens_per_s']:8.1f}")
    elif dp:
        lines.append(f"dp2: skipped ({dp.get('skipped')})")
    for name, goal in report["goals"].items():
        verdict = {True: "PASS", False: "FAIL", None: "not measured"}[goal["met"]]
        value = goal["value"]
        shown = (", ".join(f"N={k}: {v:.3f}" if v is not None else f"N={k}: -" for k, v in value.items())
                 if isinstance(value, dict) else ("-" if value is None else f"{value:,.3f}"))
        lines.append(f"goal {name} {goal['goal']}: {shown} -> {verdict}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Hit rate vs N per policy with the oracle; decisions/s vs N; DP=2 prefill tokens per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    sim = report.get("simulated")
    colors = {name: f"C{i}" for i, name in enumerate(POLICIES)}
    if sim:
        ns = sorted(int(n) for n in sim["runs"])
        policies = list(sim["runs"][str(ns[0])])
        ax = axes[0]
        for name in policies:
            ax.plot(ns, [sim["runs"][str(n)][name]["hit_rate"] * 100 for n in ns], "o-", label=name, color=colors.get(name))
        anchor = "cache_aware" if "cache_aware" in policies else policies[0]
        ax.plot(ns, [sim["runs"][str(n)][anchor]["oracle_hit_rate"] * 100 for n in ns], "k--",
                label="oracle (one cache, all blocks)")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="replicas (simulated)", ylabel="prefix hit rate (% of prompt tokens)", ylim=(0, 105),
               title="Hit rate vs replicas (equal total KV blocks)")
        ax.legend(fontsize=8)
        ax = axes[1]
        for name in policies:
            ax.plot(ns, [sim["decision_1k"][str(n)][name]["decisions_per_s"] for n in ns], "o-", label=f"{name} (median)",
                    color=colors.get(name))
            ax.plot(ns, [sim["decision_1k"][str(n)][name]["decisions_per_s_quickest"] for n in ns], ":", lw=1,
                    color=colors.get(name))
        ax.axhline(GOAL_DECISIONS_PER_S, color="grey", ls="--", label=f"goal {GOAL_DECISIONS_PER_S:,.0f}/s (dotted: quickest)")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
        ax.set(xlabel="replicas (simulated)", ylabel="decisions per second (hash + choose)",
               title=f"Router decisions, {report['config']['decision_prompt_len']}-token prompts")
        ax.legend(fontsize=8)
        for ax in axes[:2]:
            ax.minorticks_off()
            ax.set_xticks(ns, [str(n) for n in ns])
    else:
        for ax in axes[:2]:
            ax.set_axis_off()
    ax = axes[2]
    dp = report.get("dp2", {}).get("results")
    if dp:
        names = list(dp)
        values = [dp[n]["prefill_tokens"] for n in names] + [dp[names[0]]["oracle_prefill_tokens"]]
        bars = ax.bar(names + ["oracle"], values, color=[colors.get(n, "grey") for n in names] + ["black"])
        ax.bar_label(bars, labels=[f"{v:,}" for v in values], fontsize=8)
        ax.bar_label(bars, labels=[f"hit {dp[n]['hit_rate']:.0%}" for n in names]
                     + [f"hit {dp[names[0]]['oracle_hit_rate']:.0%}"], label_type="center", fontsize=8, color="white")
        ax.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
        ax.set(ylabel="prefill tokens computed", title=f"DP={report['config']['dp_size']}, tiny model: prefill per policy")
    else:
        ax.set_axis_off()
        ax.set_title("DP run skipped")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- entry point ------------------------------------------------------------------------------------
