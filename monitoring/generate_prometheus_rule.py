"""Writes k8s/base/monitoring/prometheusrule.yaml: monitoring/alerts.yml as a PrometheusRule.

    python3 monitoring/generate_prometheus_rule.py           # (re)write the file
    python3 monitoring/generate_prometheus_rule.py --check   # exit 1 if it is stale

monitoring/alerts.yml stays the single source of the alert rules (compose's Prometheus loads it,
promtool tests it); on Kubernetes the Prometheus Operator (kube-prometheus-stack) loads the same
groups from this PrometheusRule. tests/deploy checks the two agree.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "alerts.yml"
TARGET = HERE.parent / "k8s" / "base" / "monitoring" / "prometheusrule.yaml"
HEADER = """\
# Generated from monitoring/alerts.yml by monitoring/generate_prometheus_rule.py: do not edit.
# dandelion's alert rules for the Prometheus Operator (kube-prometheus-stack selects rules by
# the `release` label). Runbooks: docs/monitoring.md.
"""


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: object) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    groups = yaml.safe_load(SOURCE.read_text())["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "dandelion-alerts",
            "labels": {
                "app.kubernetes.io/name": "dandelion-alerts",
                "release": "kube-prometheus-stack",
            },
        },
        "spec": {"groups": groups},
    }
    body = yaml.dump(rule, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Fail if the file is stale.")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET.name} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
