"""Helpers shared by the monitoring tests: metric names in PromQL, the metrics catalogue of
docs/monitoring.md, the dashboards' queries, the alert rules, drifted image variants."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageEnhance

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
DASHBOARDS = MONITORING / "grafana" / "dashboards"
DOC = ROOT / "docs" / "monitoring.md"
MAPPING = MONITORING / "statsd-mapping.yml"

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


# --- the statsd-exporter's mapping rules (github.com/prometheus/statsd_exporter pkg/mapper) ---
_STATSD_METRIC = r"[a-zA-Z_](-?[a-zA-Z0-9_])*"
_TEMPLATE = r"(\$\{?\d+\}?)"
METRIC_LINE_RE = re.compile(rf"^(\*\.|{_STATSD_METRIC}\.)+(\*|{_STATSD_METRIC})$")
METRIC_NAME_RE = re.compile(rf"^([a-zA-Z_]|{_TEMPLATE})([a-zA-Z0-9_]|{_TEMPLATE})*$")
LABEL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]+$")
PROM_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")

STATSD_TYPE = {"counter": "counter", "gauge": "gauge", "timer": "observer"}


@dataclass
class Mapping:
    match: str
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    match_type: str = "glob"
    action: str = "map"
    observer_type: str = ""
    match_metric_type: str = ""
    regex: re.Pattern[str] | None = None


def load_mappings(text: str) -> list[Mapping]:  # noqa: C901 - mirrors the exporter checks
    """Parse and validate like ``MetricMapper.InitFromYAMLString``; raise ValueError."""
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict) or not isinstance(doc.get("mappings"), list):
        raise ValueError("no 'mappings' list")
    known_top = {"defaults", "mappings"}
    if set(doc) - known_top:
        raise ValueError(f"unknown top-level keys {set(doc) - known_top}")
    defaults = doc.get("defaults") or {}
    known = {
        "match", "name", "labels", "observer_type", "timer_type", "buckets", "quantiles",
        "match_type", "help", "action", "match_metric_type", "ttl", "summary_options",
        "histogram_options", "scale", "honor_labels",
    }  # fmt: skip
    out = []
    for i, raw in enumerate(doc["mappings"]):
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"mapping {i}: unknown keys {unknown}")
        labels = {str(k): str(v) for k, v in (raw.get("labels") or {}).items()}
        for key in labels:
            if not LABEL_NAME_RE.match(key):
                raise ValueError(f"invalid label key: {key}")
        name = raw.get("name") or ""
        if not name:
            raise ValueError(f"line {i}: metric mapping didn't set a metric name")
        if not METRIC_NAME_RE.match(name):
            raise ValueError(f"metric name {name!r} is invalid")
        m = Mapping(
            match=raw["match"],
            name=name,
            labels=labels,
            match_type=raw.get("match_type") or defaults.get("match_type") or "glob",
            action=raw.get("action") or "map",
            observer_type=raw.get("observer_type") or defaults.get("observer_type") or "",
            match_metric_type=raw.get("match_metric_type") or "",
        )
        if m.match_type not in ("glob", "regex"):
            raise ValueError(f"invalid match_type {m.match_type}")
        if m.action not in ("map", "drop"):
            raise ValueError(f"invalid action {m.action}")
        if m.observer_type not in ("", "histogram", "summary"):
            raise ValueError(f"invalid observer_type {m.observer_type}")
        if m.match_metric_type not in ("", "counter", "gauge", "observer"):
            raise ValueError(f"invalid match_metric_type {m.match_metric_type}")
        if m.observer_type == "histogram" and raw.get("summary_options"):
            raise ValueError("cannot use histogram observer and summary options at the same time")
        if m.observer_type == "summary" and raw.get("histogram_options"):
            raise ValueError("cannot use summary observer and histogram options at the same time")
        if m.match_type == "glob" and not METRIC_LINE_RE.match(m.match):
            raise ValueError(f"invalid match: {m.match}")
        if m.match_type == "regex":
            m.regex = re.compile(m.match)
        out.append(m)
    buckets = (defaults.get("histogram_options") or {}).get("buckets")
    if buckets is not None and buckets != sorted(buckets):
        raise ValueError("histogram buckets must be increasing")
    return out


def format_template(template: str, captures: list[str]) -> str:
    return re.sub(r"\$\{?(\d+)\}?", lambda m: captures[int(m.group(1)) - 1], template)


def map_metric(
    mappings: list[Mapping], name: str, statsd_type: str
) -> tuple[Mapping, str, dict[str, str]] | None:
    """The mapping, Prometheus name and labels of one StatsD metric (None: unmatched)."""
    parts = name.split(".")
    for m in mappings:  # globs first, in file order (glob_disable_ordering: false)
        if m.match_type != "glob" or m.match_metric_type not in ("", statsd_type):
            continue
        pattern = m.match.split(".")
        if len(pattern) == len(parts) and all(
            p in ("*", q) for p, q in zip(pattern, parts, strict=True)
        ):
            captures = [q for p, q in zip(pattern, parts, strict=True) if p == "*"]
            labels = {k: format_template(v, captures) for k, v in m.labels.items()}
            return m, format_template(m.name, captures), labels
    for m in mappings:
        if m.regex is None or m.match_metric_type not in ("", statsd_type):
            continue
        found = m.regex.search(name)
        if found:
            groups = [found.group(0), *found.groups()]

            def expand(t: str, groups: list[str] = groups) -> str:
                return re.sub(r"\$\{?(\d+)\}?", lambda g: groups[int(g.group(1))] or "", t)

            return m, expand(m.name), {k: expand(v) for k, v in m.labels.items()}
    return None


def exposed_names(name: str, statsd_type: str, mapping: Mapping) -> list[str]:
    """The series names the exporter exposes for one mapped metric."""
    if statsd_type == "observer":
        if mapping.observer_type == "summary":
            return [name, f"{name}_sum", f"{name}_count"]
        return [f"{name}_bucket", f"{name}_sum", f"{name}_count"]
    return [name]
