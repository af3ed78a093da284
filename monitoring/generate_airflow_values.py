"""Writes monitoring/airflow-statsd-values.yaml: the statsd-exporter mapping as Helm values.

    .venv/bin/python monitoring/generate_airflow_values.py           # (re)write the file
    .venv/bin/python monitoring/generate_airflow_values.py --check   # exit 1 if it is stale

The official Airflow chart renders ``statsd.overrideMappings`` as its exporter's mapping
list, so the chart's statsd-exporter on Kubernetes uses the same mapping as compose.yaml's:

    helm upgrade --install airflow apache-airflow/airflow ... \\
      -f k8s/airflow/values.yaml -f monitoring/airflow-statsd-values.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "statsd-mapping.yml"
TARGET = HERE / "airflow-statsd-values.yaml"
HEADER = """\
# Generated from monitoring/statsd-mapping.yml by monitoring/generate_airflow_values.py:
# do not edit. Helm values for the official Airflow chart, so that its statsd-exporter maps
# Airflow's StatsD metrics to the names dandelion's dashboards and alerts use:
#   helm upgrade --install airflow apache-airflow/airflow ... \\
#     -f k8s/airflow/values.yaml -f monitoring/airflow-statsd-values.yaml
"""


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data: object) -> bool:
        return True


def render() -> str:
    mappings = yaml.safe_load(SOURCE.read_text())["mappings"]
    body = yaml.dump(
        {"statsd": {"overrideMappings": mappings}},
        Dumper=_NoAliases,
        sort_keys=False,
        default_flow_style=False,
        width=100,
    )
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Fail if the file is stale.")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET.name} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
