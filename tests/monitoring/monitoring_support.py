"""Helpers shared by the monitoring tests: metric names in PromQL, the metrics catalogue of
docs/monitoring.md, the dashboards' queries, the alert rules, drifted image variants."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageEnhance

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
DASHBOARDS = MONITORING / "grafana" / "dashboards"
DOC = ROOT / "docs" / "monitoring.md"

_KEYWORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "offset", "bool", "inf", "nan", "atan2",
}  # fmt: skip
_IDENT = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _strip(expr: str) -> str:
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    return re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)


def metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (functions, keywords, labels excluded)."""
    stripped = _strip(expr)
    no_matchers = re.sub(r"\{[^}]*\}", " ", stripped)
    names = set()
    for m in _IDENT.finditer(no_matchers):
        name = m.group(1)
        rest = no_matchers[m.end() :].lstrip()
        if name in _KEYWORDS or rest.startswith("("):
            continue
        names.add(name)
    return names


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) for every ``name{...}`` selector."""
    stripped = _strip(expr)
    out = []
    for m in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", stripped):
        labels = {lm.group(1) for lm in re.finditer(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", m.group(2))}
        out.append((m.group(1), labels))
    return out


def grouping_labels(expr: str) -> set[str]:
    """Label names of every ``by (...)`` clause."""
    labels: set[str] = set()
    for m in re.finditer(r"\bby\s*\(([^)]*)\)", expr):
        labels |= {x.strip() for x in m.group(1).split(",") if x.strip()}
    return labels


def catalogue() -> dict[str, dict[str, Any]]:
    """The metrics catalogue of docs/monitoring.md: name -> {type, labels, source}.

    Rows look like ``| `name` | type | label, label | source | meaning |``.
    """
    text = DOC.read_text()
    section = text.split("## Metrics catalogue", 1)[1].split("\n## ", 1)[0]
    out = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`([a-zA-Z_:][\w:]*)`\s*\|([^|]*)\|([^|]*)\|([^|]*)\|", line)
        if m:
            labels = {x.strip(" `") for x in m.group(3).split(",") if x.strip(" `-")}
            out[m.group(1)] = {
                "type": m.group(2).strip(),
                "labels": labels,
                "source": m.group(4).strip(),
            }
    return out


def base_name(name: str, known: dict[str, dict[str, Any]]) -> str | None:
    """The catalogued metric a series name belongs to (histogram suffixes resolved)."""
    if name in known:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and known.get(name[: -len(suffix)], {}).get("type") == "histogram":
            return name[: -len(suffix)]
    return None


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, PromQL) for every query of every dashboard."""
    out = []
    for name, board in dashboards().items():
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out.append((name, panel["title"], target["expr"]))
    return out


def instant(expr: str, rate_interval: str = "1m") -> str:
    """A panel's PromQL with Grafana's variables replaced, as Prometheus would receive it."""
    return expr.replace("$__rate_interval", rate_interval)


def alert_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [r for g in rules["groups"] for r in g["rules"] if "alert" in r]


def darken(img: Image.Image) -> Image.Image:
    """A photo taken at dusk: 15% of the brightness."""
    return ImageEnhance.Brightness(img).enhance(0.15)


def grayscale(img: Image.Image) -> Image.Image:
    return img.convert("L").convert("RGB")
