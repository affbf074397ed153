#!/usr/bin/python3
"""Draws the Grafana dashboard's panels as one PNG from real Prometheus data.

Input: the JSON that `tests/deploy/prometheus_e2e.py --dump-range FILE` writes (every panel
target's range query against a live `strata serve`). Layout, titles, legends and units come
from deploy/grafana/strata-dashboard.json, so the picture shows what Grafana would draw.
tools/render_dashboard.sh runs both steps and writes docs/dashboard.png.

    /usr/bin/python3 deploy/grafana/plot_dashboard.py DUMP.json OUT.png

Needs matplotlib (Debian: python3-matplotlib).
"""
import datetime
import json
import pathlib
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)
from matplotlib import ticker  # noqa: E402

DASHBOARD = pathlib.Path(__file__).resolve().parent / "strata-dashboard.json"
ROW_PX = 34  # Grafana grid row height, scaled
BG, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3038"
COLORS = ["#73bf69", "#f2cc0c", "#5794f2", "#ff9830", "#f2495c", "#b877d9", "#8ab8ff"]


def fmt_unit(unit):
    def si(v, suffix=""):
        for scale, p in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= scale:
                return f"{v / scale:.3g}{p}{suffix}"
        return f"{v:.3g}{suffix}"

    if unit == "percentunit":
        return lambda v, _=None: f"{v * 100:.0f}%"
    if unit == "s":
        return lambda v, _=None: (f"{v * 1e3:.3g} ms" if 0 < abs(v) < 1 else f"{v:.3g} s")
    if unit == "Bps":
        def b(v, _=None):
            for scale, p in ((2**30, "GiB/s"), (2**20, "MiB/s"), (2**10, "KiB/s")):
                if abs(v) >= scale:
                    return f"{v / scale:.3g} {p}"
            return f"{v:.3g} B/s"
        return b
    if unit == "reqps":
        return lambda v, _=None: si(v, " req/s")
    return lambda v, _=None: si(v)


def legend(fmt, metric):
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt or "")
    return text.strip() or "{" + ", ".join(f'{k}="{v}"' for k, v in metric.items()) + "}"


def shorten(text, n=48):
    return text if len(text) <= n else "…" + text[-(n - 1):]


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    dump = json.loads(pathlib.Path(argv[1]).read_text())
    dash = json.loads(DASHBOARD.read_text())
    results = {(p["title"], p["ref"]): p["result"] for p in dump["panels"]}

    panels = dash["panels"]
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(24, height * ROW_PX / 72 + 1.0), facecolor=BG)
    top = 0.6 / (height * ROW_PX / 72 + 1.0)
    fig.text(0.01, 1 - top / 2, dash["title"], color=TEXT, fontsize=18, va="center",
             weight="bold")
    start = datetime.datetime.fromtimestamp(dump["start"]).strftime("%Y-%m-%d %H:%M:%S")
    variables = ", ".join(f"{k}={'|'.join(shorten(x, 40) for x in v)}"
                          for k, v in dump["variables"].items())
    fig.text(0.99, 1 - top / 2,
             f"live data: strata serve --device cpu (stories15M), {start}, "
             f"{dump['end'] - dump['start']:.0f} s; {variables}",
             color="#8e8e8e", fontsize=10, va="center", ha="right")

    def box(gp):
        x = gp["x"] / 24
        w = gp["w"] / 24
        y = 1 - top - (gp["y"] + gp["h"]) / height * (1 - top)
        h = gp["h"] / height * (1 - top)
        return x, y, w, h

    for p in panels:
        x, y, w, h = box(p["gridPos"])
        if p["type"] == "row":
            fig.text(x + 0.005, y + h / 2, p["title"], color=TEXT, fontsize=13, va="center",
                     weight="bold")
            continue
        # Room on the left for tick labels (timeseries), a small gap elsewhere.
        left = 0.03 if p["type"] == "timeseries" else 0.004
        pad_x, pad_y = 0.004, 0.008
        ax = fig.add_axes([x + left, y + pad_y, w - left - pad_x, h - 2 * pad_y], facecolor=PANEL)
        for s in ax.spines.values():
            s.set_color(GRID)
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        fmt = fmt_unit(unit)
        ax.set_title(p["title"], color=TEXT, fontsize=11, loc="left", pad=4)
        series = []
        for t in p["targets"]:
            r = results.get((p["title"], t["refId"]), {})
            for s in r.get("data", {}).get("result", []):
                pts = [(float(a), float(b)) for a, b in s["values"] if b not in ("NaN",)]
                series.append((legend(t.get("legendFormat"), s["metric"]), s["metric"], pts))
        if p["type"] == "stat":
            ax.set_xticks([])
            ax.set_yticks([])
            last = [pts[-1][1] for _, _, pts in series if pts]
            ax.text(0.5, 0.45, fmt(sum(last)) if last else "no data", color=COLORS[0],
                    fontsize=26, ha="center", va="center", transform=ax.transAxes, weight="bold")
            for _, _, pts in series:
                if pts:
                    xs = [a for a, _ in pts]
                    ys = [b for _, b in pts]
                    ax2 = ax.inset_axes([0, 0, 1, 0.35])
                    ax2.fill_between(xs, ys, color=COLORS[0], alpha=0.2)
                    ax2.set_axis_off()
            continue
        if p["type"] == "table":
            ax.set_xticks([])
            ax.set_yticks([])
            cols = ["model", "kv_dtype", "kv_scale_mode", "block_size", "tp_size", "device",
                    "instance"]
            rows = [[shorten(m.get(c, ""), 60) for c in cols] for _, m, _ in series]
            tbl = ax.table(cellText=rows or [["no data"] + [""] * (len(cols) - 1)],
                           colLabels=cols, loc="upper center", cellLoc="left",
                           bbox=[0.005, 0.35, 0.99, 0.55])
            tbl.auto_set_font_size(False)
            tbl.set_fontsize(10)
            for cell in tbl.get_celld().values():
                cell.set_facecolor(PANEL)
                cell.set_edgecolor(GRID)
                cell.get_text().set_color(TEXT)
            continue
        t0 = dump["start"]
        for i, (name, _, pts) in enumerate(series):
            if not pts:
                continue
            ax.plot([a - t0 for a, _ in pts], [b for _, b in pts], color=COLORS[i % len(COLORS)],
                    lw=1.6, label=shorten(name, 36))
        if not any(pts for _, _, pts in series):
            ax.text(0.5, 0.5, "no data", color="#8e8e8e", ha="center", va="center",
                    transform=ax.transAxes)
        d = p.get("fieldConfig", {}).get("defaults", {})
        if "min" in d:
            ax.set_ylim(bottom=d["min"])
        if "max" in d:
            ax.set_ylim(top=d["max"])
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(fmt))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.0f}s"))
        ax.tick_params(colors="#9fa7b3", labelsize=8)
        ax.grid(color=GRID, lw=0.6)
        if series:
            ax.legend(loc="upper left", fontsize=8, facecolor=PANEL, edgecolor=GRID,
                      labelcolor=TEXT, ncol=min(3, len(series)))
    fig.savefig(argv[2], dpi=72, facecolor=BG)
    print(f"wrote {argv[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
