#!/usr/bin/env python3
"""Turns strata-serving-bench (and bench/peer_hf.py) result JSON files into a markdown table
and a PNG plot.

    tools/bench_report.py results/*.json --markdown report.md --plot report.png

One table row per file: label, KV dtype, TP, workload, request rate / concurrency, request and
token throughputs, TTFT and TPOT p50/p99, peak KV usage and preemptions during the run. The plot
has output tokens/s per run (grouped by workload, coloured by KV dtype) and a latency panel
(TTFT and TPOT p50/p99). Needs only the standard library; the plot needs matplotlib and is
skipped with a message when it is missing. Exit code 2 when an input is not a result file.
"""

import argparse
import json
import sys

COLUMNS = [
    "label", "kv dtype", "tp", "workload", "rate / conc.", "req/s", "out tok/s",
    "out tok/s to last admission", "total tok/s",
    "TTFT p50 (ms)", "TTFT p99 (ms)", "TPOT p50 (ms)", "TPOT p99 (ms)", "peak KV", "preempt.",
]


class BadInput(Exception):
    pass


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _num(v, fmt):
    return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def load(path):
    try:
        with open(path, encoding="utf-8") as f:
            r = json.load(f)
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: {e}") from e
    if not isinstance(r, dict) or not isinstance(r.get("results"), dict) \
            or not isinstance(r.get("benchmark"), dict):
        raise BadInput(f"{path}: not a strata-serving-bench result (no 'benchmark'/'results')")
    return r


def row(r, path):
    b, res = r["benchmark"], r["results"]
    info = _get(r, "server", "model_info") or {}
    mon = _get(r, "server", "monitor") or {}
    rate = b.get("request_rate")
    conc = b.get("concurrency") or 0
    rate_text = "inf" if rate in (None, "inf") else _num(rate, "{:g}")
    kv = info.get("kv_cache_dtype") or "-"
    if info.get("kv_scale_mode") not in (None, "", "none"):
        kv = f"{kv}/{info['kv_scale_mode']}"
    peak = mon.get("peak_kv_usage_gpu")
    return {
        "label": str(b.get("label") or path),
        "kv dtype": kv,
        "kv_dtype_plain": info.get("kv_cache_dtype") or "?",
        "tp": str(info.get("tp_size", "-")),
        "workload": (f"fixed {b['input_len']}/{b['output_len']}"
                     if b.get("workload") == "fixed" and b.get("input_len") else
                     str(b.get("workload", "-"))),
        "rate / conc.": f"{rate_text} / {conc if conc else '-'}",
        "req/s": _num(res.get("request_throughput"), "{:.2f}"),
        "out tok/s": _num(res.get("output_throughput"), "{:.1f}"),
        "out tok/s to last admission": _num(res.get("saturated_output_throughput"), "{:.1f}"),
        "total tok/s": _num(res.get("total_token_throughput"), "{:.1f}"),
        "TTFT p50 (ms)": _num(_get(res, "ttft_ms", "p50"), "{:.1f}"),
        "TTFT p99 (ms)": _num(_get(res, "ttft_ms", "p99"), "{:.1f}"),
        "TPOT p50 (ms)": _num(_get(res, "tpot_ms", "p50"), "{:.2f}"),
        "TPOT p99 (ms)": _num(_get(res, "tpot_ms", "p99"), "{:.2f}"),
        "peak KV": _num(peak * 100 if isinstance(peak, (int, float)) else None, "{:.1f}%"),
        "preempt.": _num(mon.get("preemptions"), "{:g}"),
        # raw values for the plot
        "_out": res.get("output_throughput"),
        "_lat": [_get(res, "ttft_ms", "p50"), _get(res, "ttft_ms", "p99"),
                 _get(res, "tpot_ms", "p50"), _get(res, "tpot_ms", "p99")],
        "_failed": res.get("failed") or 0,
    }


def markdown(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join(" --- " for _ in COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(r[c] for c in COLUMNS) + " |")
    failed = [f"{r['label']} ({r['_failed']})" for r in rows if r["_failed"]]
    if failed:
        lines.append("")
        lines.append("Runs with failed requests (throughputs count successful ones only): "
                     + ", ".join(failed) + ".")
    return "\n".join(lines) + "\n"


def plot(rows, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: plot {path} skipped (pip install matplotlib)")
        return False
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["workload"], rows[i]["kv_dtype_plain"]))
    rows = [rows[i] for i in order]
    dtypes = sorted({r["kv_dtype_plain"] for r in rows})
    cmap = plt.get_cmap("tab10")
    color = {d: cmap(i % 10) for i, d in enumerate(dtypes)}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(rows) + 4), 4.8))
    x = range(len(rows))
    names = [f"{r['workload']}\n{r['label']}" for r in rows]
    ax1.bar(x, [r["_out"] or 0 for r in rows], color=[color[r["kv_dtype_plain"]] for r in rows])
    ax1.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    ax1.set_ylabel("output tokens/s")
    ax1.set_title("Output throughput (colour: KV dtype)")
    ax1.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=color[d]) for d in dtypes],
               labels=dtypes, fontsize=8)
    width = 0.2
    series = ["TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99"]
    for k, name in enumerate(series):
        vals = [r["_lat"][k] if isinstance(r["_lat"][k], (int, float)) else 0 for r in rows]
        ax2.bar([i + (k - 1.5) * width for i in x], vals, width, label=name)
    ax2.set_yscale("log")
    ax2.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    ax2.set_ylabel("ms (log scale)")
    ax2.set_title("Latency")
    ax2.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="result JSON files (strata-serving-bench --output)")
    p.add_argument("--markdown", help="write the table here (it is always printed)")
    p.add_argument("--plot", help="write a PNG plot here (needs matplotlib)")
    p.add_argument("--title", default="", help="plot title")
    a = p.parse_args(argv)
    try:
        rows = [row(load(path), path) for path in a.results]
    except BadInput as e:
        print(f"bench_report: {e}", file=sys.stderr)
        return 2
    table = markdown(rows)
    sys.stdout.write(table)
    if a.markdown:
        with open(a.markdown, "w", encoding="utf-8") as f:
            f.write(table)
    if a.plot:
        plot(rows, a.plot, a.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
