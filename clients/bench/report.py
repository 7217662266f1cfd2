"""Showing a benchmark run: rich tables on the terminal, the JSON file, and PNG plots (matplotlib).

The results are one plain dict (see ``cli.py`` for its shape):
``results["targets"][target]["workloads"][workload]`` is a summary from ``workloads.py``, or
``{"skipped": reason}`` / ``{"error": message}``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from rich.console import Console
from rich.table import Table

GiB = 1024**3
PLOT_FILES = {"throughput": "throughput.png", "ttft_by_turn": "ttft_by_turn.png", "itl": "itl.png"}


# --- ratios -------------------------------------------------------------------------------------------------


def headline(workload: str, summary: dict) -> float | None:
    """The one number a workload is compared by: decode tokens/s (single), aggregate tokens/s (conc-N), prompt
    tokens prefilled a second (prefill)."""
    if workload == "single":
        return summary.get("decode_tokens_per_s")
    if workload.startswith("conc-"):
        return summary.get("tokens_per_s")
    if workload == "prefill":
        return summary.get("prefill_tokens_per_s")
    return None


def compute_ratios(results: dict, baseline: str) -> dict:
    """Each target's headline figure over the baseline's, per workload, from the same run."""
    targets = results["targets"]
    base = targets.get(baseline, {}).get("workloads", {})
    ratios: dict[str, dict[str, float]] = {}
    for workload, base_summary in base.items():
        b = headline(workload, base_summary)
        if not b:
            continue
        for name, t in targets.items():
            v = headline(workload, t.get("workloads", {}).get(workload, {}))
            if v is not None:
                ratios.setdefault(workload, {})[name] = v / b
    return {"baseline": baseline, "figure": "single: decode tokens/s; conc-N: aggregate tokens/s; prefill: prompt "
            "tokens/s", "by_workload": ratios}


# --- terminal -----------------------------------------------------------------------------------------------


def _num(v, fmt: str = "{:.1f}") -> str:
    return "–" if v is None else fmt.format(v)


def _ms(v) -> str:
    return "–" if v is None else f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"


def _bytes(v) -> str:
    return "–" if v is None else f"{v / GiB:.2f} GiB" if v >= GiB else f"{v / 1024**2:.0f} MiB"


def _status(summary: dict) -> str | None:
    if "skipped" in summary:
        return f"[dim]skipped: {summary['skipped']}[/dim]"
    if "error" in summary:
        return f"[red]error: {summary['error']}[/red]"
    return None


def _measured(table: Table, targets: dict, workload: str, *lead: str):
    """(target name, summary) of the targets that ran ``workload``; a skipped or failed one gets its status row
    (after the ``lead`` cells) in ``table`` instead."""
    for name, t in targets.items():
        s = t.get("workloads", {}).get(workload)
        if s is None:
            continue
        if (msg := _status(s)) is not None:
            table.add_row(*lead, name, msg)
            continue
        yield name, s


def print_report(console: Console, results: dict) -> None:
    targets: dict = results["targets"]
    ratios = results.get("ratios", {}).get("by_workload", {})
    baseline = results.get("ratios", {}).get("baseline")

    info = Table(title="Targets")
    for col in ("target", "model", "dtype, device", "KV tokens", "KV B/token", "KV cache", "RSS (peak)"):
        info.add_column(col)
    problems = []
    for name, t in targets.items():
        if "error" in t:
            info.add_row(name, "[yellow]not run[/yellow]" if t.get("unavailable") else "[red]failed[/red]")
            problems.append(f"{name}: {t['error']}")
            continue
        i, mem = t["info"], t.get("memory", {})
        rss = "–" if not mem else f"{_bytes(mem.get('rss_bytes'))} ({_bytes(mem.get('peak_rss_bytes'))})"
        info.add_row(name, i.get("model") or "–", f"{i.get('dtype') or '–'}, {i.get('device') or '–'}",
                     _num(i.get("kv_cache_tokens"), "{:,}"), _num(i.get("kv_bytes_per_token"), "{:,}"),
                     _bytes(i.get("kv_cache_bytes")), rss)
    console.print(info)
    for line in problems:
        console.print(line, markup=False, highlight=False)

    workloads = [w for w in results["plan"]["workload_names"]]
    measured = [n for n, t in targets.items() if "error" not in t]
    ratio_col = f"x {baseline}" if baseline and len(measured) > 1 else None

    if "single" in workloads:
        table = Table(title="single: one stream, forced tokens")
        for col in ("target", "TTFT", "decode tok/s", *([ratio_col] if ratio_col else [])):
            table.add_column(col, justify="right" if col != "target" else "left")
        for name, s in _measured(table, targets, "single"):
            r = ratios.get("single", {}).get(name)
            table.add_row(name, _ms(s["ttft_s"]), _num(s["decode_tokens_per_s"]),
                          *([_num(r, "{:.2f}x")] if ratio_col else []))
        console.print(table)

    conc = [w for w in workloads if w.startswith("conc-")]
    if conc:
        table = Table(title="conc-N: N concurrent questions, forced tokens")
        cols = ("N", "target", "tok/s", *([ratio_col] if ratio_col else []), "TTFT p50", "TTFT p99", "ITL p50",
                "ITL p99")
        for col in cols:
            table.add_column(col, justify="left" if col == "target" else "right")
        for w in conc:
            n = w.split("-", 1)[1]
            for name, s in _measured(table, targets, w, n):
                r = ratios.get(w, {}).get(name)
                table.add_row(n, name, _num(s["tokens_per_s"]), *([_num(r, "{:.2f}x")] if ratio_col else []),
                              _ms(s["ttft_p50_s"]), _ms(s["ttft_p99_s"]), _ms(s["itl_p50_s"]), _ms(s["itl_p99_s"]))
            table.add_section()
        console.print(table)

    if "turns" in workloads:
        num_turns = results["plan"]["num_turns"]
        table = Table(title="turns: median TTFT by turn (cached prompt tokens / prompt tokens)")
        table.add_column("target")
        for i in range(num_turns):
            table.add_column(f"turn {i + 1}", justify="right")
        for name, s in _measured(table, targets, "turns"):
            cells = [f"{_ms(b['ttft_p50_s'])} ({_num(b['cached_prompt_tokens_p50'], '{:.0f}')}/"
                     f"{_num(b['prompt_tokens_p50'], '{:.0f}')})" for b in s["by_turn"]]
            table.add_row(name, *cells)
        console.print(table)

    if "prefill" in workloads:
        table = Table(title="prefill: a long prompt, new each time, one forced token (medians)")
        for col in ("target", "prompt tokens (cached)", "TTFT", "prefill tok/s", *([ratio_col] if ratio_col else [])):
            table.add_column(col, justify="left" if col == "target" else "right")
        for name, s in _measured(table, targets, "prefill"):
            r = ratios.get("prefill", {}).get(name)
            table.add_row(name, f"{_num(s['prompt_tokens_p50'], '{:.0f}')} "
                                f"({_num(s['cached_prompt_tokens_p50'], '{:.0f}')})",
                          _ms(s["ttft_p50_s"]), _num(s["prefill_tokens_per_s"], "{:.0f}"),
                          *([_num(r, "{:.2f}x")] if ratio_col else []))
        console.print(table)


# --- files --------------------------------------------------------------------------------------------------


def run_dir(out: Path, stamp: str) -> Path:
    """A new folder for this run's files under ``out``: ``out/<stamp>`` (``-2``, ``-3``... if taken)."""
    path, n = out / stamp, 1
    while path.exists():
        n += 1
        path = out / f"{stamp}-{n}"
    path.mkdir(parents=True)
    return path


def write_json(results: dict, path: Path) -> Path:
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path


def _conc_series(results: dict, key: str) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for name, t in results["targets"].items():
        for w, s in t.get("workloads", {}).items():
            m = re.fullmatch(r"conc-(\d+)", w)
            if m and s.get(key) is not None:
                series.setdefault(name, []).append((int(m.group(1)), s[key]))
    return {k: sorted(v) for k, v in series.items()}


def write_plots(results: dict, folder: Path) -> dict[str, Path]:
    """PNG plots of what the run measured; a plot is left out when no target has data for it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: dict[str, Path] = {}

    throughput = _conc_series(results, "tokens_per_s")
    if throughput:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, pts in throughput.items():
            ax.plot([n for n, _ in pts], [v for _, v in pts], marker="o", label=name)
        written["throughput"] = _conc_plot(fig, ax, throughput, "aggregate generated tokens/s", "conc-N throughput",
                                           folder / PLOT_FILES["throughput"])

    p50, p99 = _conc_series(results, "itl_p50_s"), _conc_series(results, "itl_p99_s")
    if p50:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (name, pts) in enumerate(p50.items()):
            color = f"C{i}"
            ax.plot([n for n, _ in pts], [v * 1000 for _, v in pts], marker="o", color=color, label=f"{name} p50")
            if name in p99:
                q = p99[name]
                ax.plot([n for n, _ in q], [v * 1000 for _, v in q], marker="x", ls="--", color=color,
                        label=f"{name} p99")
        written["itl"] = _conc_plot(fig, ax, p50, "inter-token latency (ms)", "conc-N inter-token latency",
                                    folder / PLOT_FILES["itl"])

    turns = {name: t["workloads"]["turns"]["by_turn"] for name, t in results["targets"].items()
             if "by_turn" in t.get("workloads", {}).get("turns", {})}
    if turns:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
        for i, (name, by_turn) in enumerate(turns.items()):
            xs, color = [b["turn"] for b in by_turn], f"C{i}"
            ax1.plot(xs, [_nan(b["ttft_p50_s"]) for b in by_turn], marker="o", color=color, label=name)
            ax2.plot(xs, [_nan(b["cached_prompt_tokens_p50"]) for b in by_turn], marker="o", color=color,
                     label=f"{name} cached")
            ax2.plot(xs, [_nan(b["prompt_tokens_p50"]) for b in by_turn], marker="x", ls="--", color=color,
                     label=f"{name} prompt")
        ax1.set_xlabel("turn")
        ax1.set_ylabel("median TTFT (s)")
        ax1.set_title("TTFT by turn")
        ax2.set_xlabel("turn")
        ax2.set_ylabel("tokens (median)")
        ax2.set_title("prompt and cached prompt tokens by turn")
        for ax in (ax1, ax2):
            ax.set_xticks(range(1, max(len(b) for b in turns.values()) + 1))
            ax.grid(True, alpha=0.3)
            ax.legend()
        written["ttft_by_turn"] = _save(fig, folder / PLOT_FILES["ttft_by_turn"])
    return written


def _conc_plot(fig, ax, series: dict, ylabel: str, title: str, path: Path) -> Path:
    """A conc-N plot's axes, labels and grid, saved to ``path``."""
    _concurrency_axis(ax, series)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _concurrency_axis(ax, series: dict[str, list[tuple[int, float]]]) -> None:
    levels = sorted({n for pts in series.values() for n, _ in pts})
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(n) for n in levels])
    ax.minorticks_off()
    ax.set_xlabel("concurrent requests (N)")


def _nan(v: float | None) -> float:
    return float("nan") if v is None else v


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
