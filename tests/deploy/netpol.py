"""A small NetworkPolicy evaluator (networking.k8s.io/v1 semantics) and the Airflow chart's
policies as our values configure them.

Semantics implemented (Kubernetes API reference, "NetworkPolicy"):
- A pod is isolated for ingress (egress) when at least one policy in its namespace selects it
  (``spec.podSelector``) and has ``Ingress`` (``Egress``) in its policy types. A policy without
  ``policyTypes`` has ``Ingress``, plus ``Egress`` when it has an ``egress`` section.
- A non-isolated direction allows everything. An isolated one allows a connection when any rule
  of any selecting policy allows it (policies are additive, never subtractive).
- A rule allows a peer when ``from``/``to`` is absent or empty (every peer) or one of its peers
  matches, and the port when ``ports`` is absent or empty or one entry matches (protocol defaults
  to TCP; a named port is resolved against the destination pod's container ports; ``endPort``
  gives a range).
- Peers: ``podSelector`` alone selects pods of the policy's namespace; ``namespaceSelector``
  alone, every pod of the selected namespaces; both together, the selected pods of the selected
  namespaces; ``ipBlock`` matches addresses in ``cidr`` and not in ``except``. ipBlock is
  evaluated for endpoints outside the cluster only: for pod IPs its effect is left to the
  network plugin by the specification, so pods are never matched by ipBlock here.
- Label selectors: ``matchLabels`` and ``matchExpressions`` (In, NotIn, Exists, DoesNotExist),
  ANDed; an empty selector matches everything.
- A connection between two endpoints is allowed when the source's egress and the destination's
  ingress both allow it. Return traffic of an allowed connection is always allowed.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

Selector = dict[str, Any]
Policy = dict[str, Any]


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: dict[str, str]
    # (name or None, number, protocol) of the pod's container ports
    ports: tuple[tuple[str | None, int, str], ...] = ()


@dataclass(frozen=True)
class External:
    """An endpoint outside the cluster (an internet client, a managed database)."""

    name: str
    ip: str


Endpoint = Pod | External


@dataclass
class Cluster:
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    policies: list[Policy] = field(default_factory=list)

    def add_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        # The API server sets this label on every namespace (Kubernetes >= 1.22).
        self.namespaces[name] = {"kubernetes.io/metadata.name": name, **(labels or {})}

    def allowed(self, src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> bool:
        if isinstance(src, Pod) and not self._direction_allows(src, "Egress", dst, port, protocol):
            return False
        return not (
            isinstance(dst, Pod) and not self._direction_allows(dst, "Ingress", src, port, protocol)
        )

    def _direction_allows(
        self, pod: Pod, direction: str, peer: Endpoint, port: int, protocol: str
    ) -> bool:
        selecting = [
            p
            for p in self.policies
            if p["metadata"].get("namespace") == pod.namespace
            and matches(p["spec"].get("podSelector") or {}, pod.labels)
            and direction in policy_types(p)
        ]
        if not selecting:
            return True  # not isolated in this direction
        key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        # The pod whose container ports a named port refers to: the destination.
        dst = pod if direction == "Ingress" else peer
        for policy in selecting:
            for rule in policy["spec"].get(key) or []:
                if not self._peer_allowed(policy, rule.get(peers_key) or [], peer):
                    continue
                if port_allowed(rule.get("ports") or [], dst, port, protocol):
                    return True
        return False

    def _peer_allowed(self, policy: Policy, peers: list[dict[str, Any]], peer: Endpoint) -> bool:
        if not peers:
            return True
        return any(self._peer_matches(policy, p, peer) for p in peers)

    def _peer_matches(self, policy: Policy, spec: dict[str, Any], peer: Endpoint) -> bool:
        if "ipBlock" in spec:
            if not isinstance(peer, External):
                return False
            ip = ipaddress.ip_address(peer.ip)
            block = spec["ipBlock"]
            if ip not in ipaddress.ip_network(block["cidr"]):
                return False
            return not any(ip in ipaddress.ip_network(e) for e in block.get("except") or [])
        if not isinstance(peer, Pod):
            return False
        ns_selector = spec.get("namespaceSelector")
        pod_selector = spec.get("podSelector")
        if ns_selector is None:
            in_namespace = peer.namespace == policy["metadata"].get("namespace")
        else:
            in_namespace = matches(ns_selector, self.namespaces[peer.namespace])
        return in_namespace and matches(pod_selector or {}, peer.labels)


def policy_types(policy: Policy) -> list[str]:
    spec = policy["spec"]
    if spec.get("policyTypes"):
        return list(spec["policyTypes"])
    return ["Ingress", *(["Egress"] if "egress" in spec else [])]


def matches(selector: Selector, labels: dict[str, str]) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
        if op not in {"In", "NotIn", "Exists", "DoesNotExist"}:
            raise ValueError(f"unknown selector operator {op}")
    return True


def port_allowed(ports: list[dict[str, Any]], dst: Endpoint, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        if "port" not in entry:
            return True  # every port of that protocol
        wanted = entry["port"]
        if isinstance(wanted, str) and not wanted.isdigit():
            if not isinstance(dst, Pod):
                continue  # a named port never matches outside the cluster
            named = {(n, proto): num for n, num, proto in dst.ports if n}
            if named.get((wanted, protocol)) == port:
                return True
            continue
        low = int(wanted)
        high = int(entry.get("endPort", low))
        if low <= port <= high:
            return True
    return False


# --- the official Airflow chart's NetworkPolicies ------------------------------------------------
# Reproduced from the chart's templates (apache/airflow, chart/templates/…), with our values:
# - api-server/api-server-networkpolicy.yaml: selects tier=airflow, component=api-server,
#   release=<release>; policyTypes [Ingress]; an ingress rule only when
#   apiServer.networkPolicy.ingress.from is set: `from` = that list, `ports` = each entry of
#   apiServer.networkPolicy.ingress.ports with its values passed through `tpl` (so
#   "{{ .Values.ports.apiServer }}" becomes 8080). Rendered when airflowVersion >= 3.0.0.
# - statsd/statsd-networkpolicy.yaml: selects tier=airflow, component=statsd; one rule: from
#   pods tier=airflow, release=<release> plus statsd.extraNetworkPolicies, ports UDP
#   ports.statsdIngest (9125) and TCP ports.statsdScrape (9102).
# - scheduler/scheduler-networkpolicy.yaml: selects the scheduler; Ingress; a rule (from the
#   webserver, worker-logs port) only with LocalExecutor.
# - triggerer/triggerer-networkpolicy.yaml: selects the triggerer; from component=webserver
#   pods on ports.triggererLogs (8794).
# The dag-processor has no policy template. The chart's default ports: apiServer 8080,
# statsdIngest 9125, statsdScrape 9102, triggererLogs 8794, workerLogs 8793.
CHART_PORTS = {
    "apiServer": 8080,
    "statsdIngest": 9125,
    "statsdScrape": 9102,
    "triggererLogs": 8794,
    "workerLogs": 8793,
}


def _tpl(value: Any) -> Any:
    """The chart passes port values through `tpl`: resolve the `.Values.ports.*` references."""
    text = str(value)
    for name, number in CHART_PORTS.items():
        text = text.replace("{{ .Values.ports." + name + " }}", str(number))
    if "{{" in text:
        raise ValueError(f"template not reproduced: {value!r}")
    return int(text) if text.isdigit() else text


def _policy(name: str, namespace: str, spec: dict[str, Any]) -> Policy:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def chart_policies(
    values: dict[str, Any], namespace: str, release: str = "airflow"
) -> list[Policy]:
    """The NetworkPolicies the chart renders for these (merged) values."""
    if not values.get("networkPolicies", {}).get("enabled"):
        return []
    policies = []
    api = values.get("apiServer", {})
    if api.get("enabled", True) and int(str(values["airflowVersion"]).split(".")[0]) >= 3:
        ingress_values = api.get("networkPolicy", {}).get("ingress", {})
        spec: dict[str, Any] = {
            "podSelector": {
                "matchLabels": {"tier": "airflow", "component": "api-server", "release": release}
            },
            "policyTypes": ["Ingress"],
        }
        if ingress_values.get("from"):
            spec["ingress"] = [
                {
                    "from": ingress_values["from"],
                    "ports": [
                        {k: _tpl(v) for k, v in entry.items()}
                        for entry in ingress_values.get("ports", [])
                    ],
                }
            ]
        policies.append(_policy(f"{release}-api-server-policy", namespace, spec))
    statsd = values.get("statsd", {})
    if statsd.get("enabled", True):
        peers = [{"podSelector": {"matchLabels": {"tier": "airflow", "release": release}}}]
        peers += statsd.get("extraNetworkPolicies") or []
        spec = {
            "podSelector": {
                "matchLabels": {"tier": "airflow", "component": "statsd", "release": release}
            },
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": peers,
                    "ports": [
                        {"protocol": "UDP", "port": CHART_PORTS["statsdIngest"]},
                        {"protocol": "TCP", "port": CHART_PORTS["statsdScrape"]},
                    ],
                }
            ],
        }
        policies.append(_policy(f"{release}-statsd-policy", namespace, spec))
    spec = {
        "podSelector": {
            "matchLabels": {"tier": "airflow", "component": "scheduler", "release": release}
        },
        "policyTypes": ["Ingress"],
    }
    if values.get("executor") == "LocalExecutor":
        spec["ingress"] = [
            {
                "from": [
                    {
                        "podSelector": {
                            "matchLabels": {
                                "tier": "airflow",
                                "component": "webserver",
                                "release": release,
                            }
                        }
                    }
                ],
                "ports": [{"protocol": "TCP", "port": CHART_PORTS["workerLogs"]}],
            }
        ]
    policies.append(_policy(f"{release}-scheduler-policy", namespace, spec))
    if values.get("triggerer", {}).get("enabled", True):
        spec = {
            "podSelector": {
                "matchLabels": {"tier": "airflow", "component": "triggerer", "release": release}
            },
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        {
                            "podSelector": {
                                "matchLabels": {
                                    "tier": "airflow",
                                    "release": release,
                                    "component": "webserver",
                                }
                            }
                        }
                    ],
                    "ports": [{"protocol": "TCP", "port": CHART_PORTS["triggererLogs"]}],
                }
            ],
        }
        policies.append(_policy(f"{release}-triggerer-policy", namespace, spec))
    return policies


def chart_pods(namespace: str, release: str = "airflow") -> dict[str, Pod]:
    """The chart's pods with the labels its templates give them (`tier`, `component`,
    `release`), KubernetesExecutor task pods included: chart/files/
    pod-template-file.kubernetes-helm-yaml labels them tier=airflow, component=worker,
    release=<release> (and mounts the top-level `volumes`/`volumeMounts` values)."""

    def pod(component: str, ports: tuple[tuple[str | None, int, str], ...] = ()) -> Pod:
        labels = {"tier": "airflow", "component": component, "release": release}
        return Pod(f"airflow-{component}", namespace, labels, ports)

    return {
        "airflow-api-server": pod("api-server", (("api-server", CHART_PORTS["apiServer"], "TCP"),)),
        "airflow-scheduler": pod("scheduler"),
        "airflow-dag-processor": pod("dag-processor"),
        "airflow-triggerer": pod(
            "triggerer", (("triggerer-logs", CHART_PORTS["triggererLogs"], "TCP"),)
        ),
        "airflow-task": pod("worker"),
        # No chart migration Job (migrateDatabaseJob.enabled: false): ours is
        # k8s/airflow/migrate-db/, modelled from its rendered manifest.
        "airflow-statsd": pod(
            "statsd",
            (
                ("statsd-ingest", CHART_PORTS["statsdIngest"], "UDP"),
                ("statsd-scrape", CHART_PORTS["statsdScrape"], "TCP"),
            ),
        ),
    }


def workload_pods(objs: list[dict[str, Any]]) -> dict[str, Pod]:
    """One pod per rendered workload (its template's labels and container ports)."""
    pods = {}
    for obj in objs:
        if obj["kind"] not in {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}:
            continue
        spec = obj["spec"]["jobTemplate"]["spec"] if obj["kind"] == "CronJob" else obj["spec"]
        template = spec["template"]
        ports = tuple(
            (p.get("name"), p["containerPort"], p.get("protocol", "TCP"))
            for c in template["spec"]["containers"]
            for p in c.get("ports", [])
        )
        name = obj["metadata"]["name"]
        pods[name] = Pod(name, obj["metadata"]["namespace"], template["metadata"]["labels"], ports)
    return pods


def chart_services(namespace: str, release: str = "airflow") -> list[dict[str, Any]]:
    """The chart's statsd Service (chart templates/statsd/statsd-service.yaml): labels and
    selector tier=airflow, component=statsd, release=<release>; ports statsd-ingest (UDP 9125)
    and statsd-scrape (TCP 9102), each targeting the same number."""
    labels = {"tier": "airflow", "component": "statsd", "release": release}
    return [
        {
            "kind": "Service",
            "metadata": {"name": f"{release}-statsd", "namespace": namespace, "labels": labels},
            "spec": {
                "selector": labels,
                "ports": [
                    {"name": "statsd-ingest", "protocol": "UDP", "port": 9125, "targetPort": 9125},
                    {"name": "statsd-scrape", "protocol": "TCP", "port": 9102, "targetPort": 9102},
                ],
            },
        }
    ]


def scrape_targets(
    monitors: list[dict[str, Any]], services: list[dict[str, Any]], pods: list[Pod]
) -> list[tuple[str, Pod, int]]:
    """(monitor, pod, container port) for every endpoint of every ServiceMonitor: its selected
    Services in its namespace, the named Service port, the targetPort resolved on each pod."""
    targets = []
    for monitor in monitors:
        ns = monitor["metadata"]["namespace"]
        selected = [
            svc
            for svc in services
            if svc["metadata"]["namespace"] == ns
            and matches(monitor["spec"]["selector"], svc["metadata"].get("labels", {}))
        ]
        assert selected, f"ServiceMonitor {monitor['metadata']['name']} selects no Service"
        for endpoint in monitor["spec"]["endpoints"]:
            for svc in selected:
                (port,) = [p for p in svc["spec"]["ports"] if p.get("name") == endpoint["port"]]
                backends = [
                    pod
                    for pod in pods
                    if pod.namespace == ns
                    and matches({"matchLabels": svc["spec"]["selector"]}, pod.labels)
                ]
                assert backends, f"Service {svc['metadata']['name']} selects no pod"
                for pod in backends:
                    target = port.get("targetPort", port["port"])
                    if isinstance(target, str):
                        (number,) = [n for name, n, _ in pod.ports if name == target]
                    else:
                        number = int(target)
                    targets.append((monitor["metadata"]["name"], pod, number))
    return targets
