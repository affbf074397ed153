#!/usr/bin/env python3
"""Writes deploy/grafana/strata-dashboard.json, Strata's Grafana dashboard.

The JSON is generated so that every panel is built the same way (the same model/kv_dtype filter,
units and legends); edit this file, then run it:

    /usr/bin/python3 deploy/grafana/build_dashboard.py          # rewrite the JSON
    /usr/bin/python3 deploy/grafana/build_dashboard.py --check  # fail if the JSON is stale

Metric names are the public interface in deploy/METRICS.md. Every series is joined with
strata_model_info on (job, instance), which carries model and kv_dtype; the $model and $kv_dtype
template variables filter that join. tests/deploy/prometheus_e2e.sh evaluates every target
expression of this dashboard against a live `strata serve`.
"""
import argparse
import json
import pathlib
import sys

OUT = pathlib.Path(__file__).resolve().parent / "strata-dashboard.json"
DS = {"type": "prometheus", "uid": "${datasource}"}

# Joins a (job, instance)-keyed vector with the selected servers' model and kv_dtype.
INFO = 'strata_model_info{model=~"$model", kv_dtype=~"$kv_dtype"}'
JOIN = f"* on (job, instance) group_left (model, kv_dtype) {INFO}"
RI = "$__rate_interval"


def rate(metric, by):
    return f"sum by ({by}) (rate({metric}[{RI}]) {JOIN})"


def quantile(q, hist):
    return (f"histogram_quantile({q}, sum by (le) "
            f"(rate({hist}_bucket[{RI}]) {JOIN}))")


class Layout:
    """Places panels on Grafana's 24-column grid, row by row."""

    def __init__(self):
        self.y = 0
        self.next_id = 1
        self.panels = []

    def row(self, title):
        self.panels.append({"type": "row", "title": title, "id": self._id(), "collapsed": False,
                            "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1}, "panels": []})
        self.y += 1

    def line(self, *panels, h=8):
        w = 24 // len(panels)
        for i, p in enumerate(panels):
            p["id"] = self._id()
            p["gridPos"] = {"x": i * w, "y": self.y, "w": w, "h": h}
            self.panels.append(p)
        self.y += h

    def _id(self):
        self.next_id += 1
        return self.next_id - 1


def target(expr, legend, ref, instant=False, fmt="time_series"):
    t = {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": not instant,
         "instant": instant, "format": fmt}
    return t


def timeseries(title, description, unit, targets, stack=False, minimum=None, maximum=None):
    defaults = {"unit": unit, "custom": {"fillOpacity": 15 if stack else 5, "lineWidth": 1,
                                         "stacking": {"mode": "normal" if stack else "none",
                                                      "group": "A"},
                                         "spanNulls": False}}
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    return {"type": "timeseries", "title": title, "description": description, "datasource": DS,
            "targets": [target(e, l, chr(ord("A") + i)) for i, (e, l) in enumerate(targets)],
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def stat(title, description, unit, expr):
    return {"type": "stat", "title": title, "description": description, "datasource": DS,
            "targets": [target(expr, "", "A", instant=True)],
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "area", "textMode": "auto"}}


def build():
    g = Layout()
    g.row("Overview")
    g.line(
        stat("Servers up", "Scheduler targets up with the selected model and KV format", "none",
             f"count(up {JOIN} == 1)"),
        stat("Generation tokens/s", "All selected servers", "short",
             f"sum(rate(strata_generation_tokens_total[{RI}]) {JOIN})"),
        stat("GPU KV cache used", "Highest GPU-pool usage among the selected servers",
             "percentunit", f"max(strata_kv_cache_usage_ratio{{pool=\"gpu\"}} {JOIN})"),
        stat("Requests waiting", "Admission queue, all selected servers", "none",
             f"sum(strata_requests{{state=\"waiting\"}} {JOIN})"),
        h=4)
    g.line({
        "type": "table", "title": "Servers", "datasource": DS,
        "description": "strata_model_info of every selected server",
        "targets": [target(INFO, "", "A", instant=True, fmt="table")],
        "fieldConfig": {"defaults": {}, "overrides": []},
        "transformations": [{"id": "organize", "options": {
            "excludeByName": {"Time": True, "Value": True, "__name__": True}}}],
        "options": {"showHeader": True}}, h=5)

    g.row("Throughput")
    g.line(
        timeseries("Generation throughput", "Tokens sampled per second", "short",
                   [(rate("strata_generation_tokens_total", "model, kv_dtype"),
                     "{{model}} {{kv_dtype}}")], minimum=0),
        timeseries("Prompt throughput", "Prompt tokens prefilled per second (recompute included)",
                   "short", [(rate("strata_prompt_tokens_total", "model, kv_dtype"),
                              "{{model}} {{kv_dtype}}")], minimum=0),
        timeseries("Finished requests", "Requests per second by outcome", "reqps",
                   [(rate("strata_requests_total", "outcome"), "{{outcome}}")], stack=True,
                   minimum=0))

    g.row("KV cache")
    g.line(
        timeseries("KV cache usage", "Fraction of KV blocks in use: gpu = engine pool, cpu = swap "
                   "space", "percentunit",
                   [(f"max by (instance, pool) (strata_kv_cache_usage_ratio {JOIN})",
                     "{{instance}} {{pool}}")], minimum=0, maximum=1),
        timeseries("KV blocks", "Used and total blocks per pool", "none",
                   [(f"sum by (pool, state) (strata_kv_cache_blocks {JOIN})",
                     "{{pool}} {{state}}")], minimum=0),
        timeseries("Prefix cache hit ratio", "Prompt tokens found in the prefix cache / looked up",
                   "percentunit",
                   [(f"sum(rate(strata_prefix_cache_hits_total[{RI}]) {JOIN}) / "
                     f"clamp_min(sum(rate(strata_prefix_cache_queries_total[{RI}]) {JOIN}), 1e-9)",
                     "hit ratio")], minimum=0, maximum=1))

    g.row("Queue, preemption and swap")
    g.line(
        timeseries("Sequences by state", "running, waiting (admission queue), swapped (KV in CPU "
                   "swap space)", "none",
                   [(f"sum by (state) (strata_requests {JOIN})", "{{state}}")], stack=True,
                   minimum=0),
        timeseries("Preemptions", "Sequences preempted per second, by mode", "short",
                   [(rate("strata_preemptions_total", "mode"), "{{mode}}")], stack=True,
                   minimum=0),
        timeseries("Swap traffic", "KV bytes per second between the GPU pool and CPU swap space",
                   "Bps", [(rate("strata_swap_bytes_total", "direction"), "{{direction}}")],
                   minimum=0))

    g.row("Latency")
    pct = [("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99")]
    g.line(
        timeseries("Time to first token", "Arrival to first generated token", "s",
                   [(quantile(q, "strata_time_to_first_token_seconds"), n) for q, n in pct],
                   minimum=0),
        timeseries("Time per output token", "Per request, mean time per token after the first",
                   "s", [(quantile(q, "strata_time_per_output_token_seconds"), n) for q, n in pct],
                   minimum=0))
    g.line(
        timeseries("Request duration", "Arrival to completion", "s",
                   [(quantile(q, "strata_request_duration_seconds"), n) for q, n in pct],
                   minimum=0),
        timeseries("Engine step time", "Wall time of one engine step (all workers)", "s",
                   [(quantile(q, "strata_step_duration_seconds"), n) for q, n in pct[:2]] +
                   [(f"sum(rate(strata_step_duration_seconds_sum[{RI}]) {JOIN}) / "
                     f"clamp_min(sum(rate(strata_step_duration_seconds_count[{RI}]) {JOIN}), 1e-9)",
                     "mean")], minimum=0))

    g.row("Workers (tensor-parallel ranks)")
    g.line(
        timeseries("Worker forward time", "Forward pass of one step per rank, median and p95 "
                   "(a slow rank holds up the whole group)", "s",
                   [(f"histogram_quantile({q}, sum by (le, rank) "
                     f"(rate(strata_worker_step_duration_seconds_bucket[{RI}]) {JOIN}))",
                     f"rank {{{{rank}}}} {n}") for q, n in [("0.5", "p50"), ("0.95", "p95")]],
                   minimum=0),
        timeseries("Step time by phase", "Mean time per engine step in each phase, with worker "
                   "processes: scheduler (planning, results, token delivery), control_plane "
                   "(messages to and from the slowest rank), worker (its handling around the "
                   "forward pass), forward", "s",
                   [(f"sum by (phase) (rate(strata_step_phase_seconds_total[{RI}]) {JOIN}) / "
                     f"ignoring (phase) group_left clamp_min(sum(rate(strata_steps_total[{RI}]) "
                     f"{JOIN}), 1e-9)", "{{phase}}")], stack=True, minimum=0),
        timeseries("Worker memory", "Memory per rank by use (device memory on GPU ranks; "
                   "KV and swap pools on CPU ranks)", "bytes",
                   [(f"sum by (rank, kind) (strata_worker_device_memory_bytes {JOIN})",
                     "rank {{rank}} {{kind}}")], minimum=0))

    def var(name, label, query):
        return {"name": name, "label": label, "type": "query", "datasource": DS,
                "definition": query, "query": {"query": query, "refId": f"{name}-var"},
                "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                "sort": 1, "regex": "", "hide": 0, "options": []}

    return {
        "__inputs": [],
        "title": "Strata serving",
        "uid": "strata-serving",
        "description": "Strata: throughput, KV cache (GPU pool and CPU swap), queue, preemption, "
                       "latency. Metrics: deploy/METRICS.md.",
        "tags": ["strata", "llm", "serving"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "regex": "",
             "options": []},
            var("model", "Model", "label_values(strata_model_info, model)"),
            var("kv_dtype", "KV dtype",
                'label_values(strata_model_info{model=~"$model"}, kv_dtype)'),
        ]},
        "panels": g.panels,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if the committed JSON is stale")
    args = ap.parse_args()
    text = json.dumps(build(), indent=2, sort_keys=False) + "\n"
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run {sys.argv[0]}", file=sys.stderr)
            return 1
        print(f"{OUT.name} is up to date")
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
