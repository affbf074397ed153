#!/usr/bin/python3
"""The metric names of deploy/METRICS.md ("exported today") against their sources.

    metrics_doc.py            # METRICS.md == the names scheduler/metrics.cc declares
    metrics_doc.py URL        # ... and every documented name is served at URL (/metrics)

Exit 1 on any difference, naming it.
"""
import pathlib
import re
import sys
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]


def documented():
    doc = (ROOT / "deploy/METRICS.md").read_text()
    exported = doc.split("## Scheduler metrics (exported today)")[1].split("\n## ")[0]
    return set(re.findall(r"^\| `(strata_\w+)`", exported, re.M))


def declared():
    return set(re.findall(r'Name\("(strata_\w+)"\)', (ROOT / "scheduler/metrics.cc").read_text()))


def served(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return set(re.findall(r"^# TYPE (strata_\w+) ", text, re.M))


def main(argv):
    doc, code = documented(), declared()
    errors = [f"scheduler/metrics.cc declares {n}, deploy/METRICS.md does not document it"
              for n in sorted(code - doc)]
    errors += [f"deploy/METRICS.md documents {n}, scheduler/metrics.cc does not declare it"
               for n in sorted(doc - code)]
    print(f"  {len(code)} metrics declared in scheduler/metrics.cc, {len(doc)} documented")
    if len(argv) > 1:
        live = served(argv[1])
        errors += [f"{argv[1]} does not serve documented metric {n}" for n in sorted(doc - live)]
        errors += [f"{argv[1]} serves {n}, which deploy/METRICS.md does not document"
                   for n in sorted(live - doc)]
        print(f"  {len(live)} strata_ metrics served at {argv[1]}")
    for e in errors:
        print(f"  {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
