"""The flows the architecture needs, evaluated against the NetworkPolicies that would be live:
ours (`kubectl kustomize` of each overlay, plus k8s/airflow/admin-user) and the Airflow chart's
as k8s/airflow/values*.yaml configure them. No cluster runs here: the chart's policies are
reproduced from its templates (tests/deploy/netpol.py says which, and how), and the policies are
evaluated by netpol.Cluster, a small implementation of the NetworkPolicy semantics."""

from __future__ import annotations

from typing import Any

import pytest
from deploy_support import OVERLAYS, ROOT, load, load_all, run, tool
from netpol import (
    Cluster,
    External,
    Pod,
    chart_pods,
    chart_policies,
    chart_services,
    scrape_targets,
    workload_pods,
)

from deploy.k8s_env import deep_merge

Objects = dict[str, list[dict[str, Any]]]
AIRFLOW = ROOT / "k8s" / "airflow"

INTERNET = External("internet-client", "203.0.113.7")
MANAGED_POSTGRES = External("managed-postgres", "10.0.12.5")  # in prod's database CIDR
S3 = External("s3", "52.95.0.10")


def airflow_values(overlay: str) -> dict[str, Any]:
    return deep_merge(load(AIRFLOW / "values.yaml"), load(AIRFLOW / f"values-{overlay}.yaml"))


def admin_user_objects(namespace: str, name: str = "admin-user") -> list[dict[str, Any]]:
    """One of our Airflow Jobs (admin-user, migrate-db) as deploy.sh applies it."""
    proc = run(tool("kubectl"), "kustomize", str(AIRFLOW / name))
    assert proc.returncode == 0, proc.stderr
    objs = load_all(proc.stdout)
    for obj in objs:
        obj["metadata"]["namespace"] = namespace  # deploy.sh: kustomize edit set namespace
    return objs


def build(objs: list[dict[str, Any]], overlay: str, values: dict[str, Any]) -> tuple[Cluster, dict]:
    (namespace_obj,) = [o for o in objs if o["kind"] == "Namespace"]
    ns = namespace_obj["metadata"]["name"]
    cluster = Cluster()
    cluster.add_namespace(ns, namespace_obj["metadata"].get("labels"))
    for other in ("kube-system", "monitoring", "ingress-nginx"):
        cluster.add_namespace(other)
    cluster.policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    cluster.policies += chart_policies(values, ns)
    pods: dict[str, Any] = {
        **workload_pods(objs),
        **workload_pods(admin_user_objects(ns)),
        **workload_pods(admin_user_objects(ns, "migrate-db")),
        **chart_pods(ns),
        "ingress": Pod(
            "ingress-nginx-controller", "ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"}
        ),
        "prometheus": Pod("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}),
        "kube-dns": Pod(
            "coredns",
            "kube-system",
            {"k8s-app": "kube-dns"},
            (("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")),
        ),
        "internet": INTERNET,
    }
    if overlay == "dev":
        pods["database"], pods["object-store"] = pods["postgres"], pods["minio"]
        ports = {"database": 5432, "object-store": 9000}
    else:
        pods["database"], pods["object-store"] = MANAGED_POSTGRES, S3
        ports = {"database": 5432, "object-store": 443}
    return cluster, {"pods": pods, "ports": ports}


def port_of(target: str, ports: dict[str, int], given: int | None) -> int:
    return given if given is not None else ports[target]


# (source, destination, port or None for the environment's database/object-store port, protocol)
REQUIRED = [
    # Airflow 3 task pods (and the triggerer) report to the api-server's execution API.
    ("airflow-task", "airflow-api-server", 8080, "TCP"),
    ("airflow-triggerer", "airflow-api-server", 8080, "TCP"),
    ("airflow-dag-processor", "airflow-api-server", 8080, "TCP"),
    # Metadata database: scheduler, api-server, migrations, the admin-user Job.
    ("airflow-scheduler", "database", None, "TCP"),
    ("airflow-api-server", "database", None, "TCP"),
    ("airflow-migrate-db", "database", None, "TCP"),  # our Job, before the chart
    ("airflow-admin-user", "database", None, "TCP"),
    # The pipeline's tasks: the store, MLflow, their logs; StatsD from every component.
    ("airflow-task", "object-store", None, "TCP"),
    ("airflow-task", "mlflow", 5000, "TCP"),
    ("airflow-api-server", "object-store", None, "TCP"),  # reads remote task logs
    ("airflow-task", "airflow-statsd", 9125, "UDP"),
    ("airflow-scheduler", "airflow-statsd", 9125, "UDP"),
    # Serving.
    ("api", "mlflow", 5000, "TCP"),
    ("api", "database", None, "TCP"),
    ("api", "object-store", None, "TCP"),
    ("api", "kube-dns", 53, "UDP"),
    ("app", "api", 8000, "TCP"),
    ("app", "kube-dns", 53, "UDP"),
    ("ingress", "api", 8000, "TCP"),
    ("ingress", "app", 8866, "TCP"),
    # The reviewer page reads the feedback database and the store directly, and asks the API
    # where the model looked on each photo. Reviewers reach it with `kubectl port-forward`
    # (through the API server and the kubelet: no pod-to-pod flow).
    ("review", "database", None, "TCP"),
    ("review", "api", 8000, "TCP"),
    ("review", "object-store", None, "TCP"),
    ("review", "kube-dns", 53, "UDP"),
    ("review", "kube-dns", 53, "TCP"),
    # MLflow and its schema Job.
    ("mlflow", "database", None, "TCP"),
    ("mlflow", "object-store", None, "TCP"),
    ("mlflow", "kube-dns", 53, "UDP"),
    ("mlflow-db-upgrade", "database", None, "TCP"),
    ("mlflow-db-upgrade", "kube-dns", 53, "UDP"),
    # Prometheus scrapes every target of the ServiceMonitors.
    ("prometheus", "api", 8000, "TCP"),
    ("prometheus", "mlflow", 5000, "TCP"),
    ("prometheus", "airflow-statsd", 9102, "TCP"),
]
DEV_ONLY = [
    ("minio-init", "minio", 9000, "TCP"),
    # The backup CronJobs: dumps from the database, uploads and mirrors in the object store.
    ("postgres-backup", "postgres", 5432, "TCP"),
    ("postgres-backup", "minio", 9000, "TCP"),
    ("object-store-backup", "minio", 9000, "TCP"),
]

DENIED = [
    ("app", "database", None, "TCP"),
    ("app", "mlflow", 5000, "TCP"),
    ("app", "airflow-api-server", 8080, "TCP"),
    ("ingress", "mlflow", 5000, "TCP"),
    ("ingress", "airflow-api-server", 8080, "TCP"),
    ("internet", "api", 8000, "TCP"),  # only through the ingress controller
    ("internet", "airflow-api-server", 8080, "TCP"),
    ("api", "airflow-api-server", 8080, "TCP"),
    ("airflow-task", "api", 8000, "TCP"),
    ("app", "airflow-statsd", 9125, "UDP"),
    ("prometheus", "airflow-api-server", 8080, "TCP"),
    ("mlflow-db-upgrade", "mlflow", 5000, "TCP"),
    # The reviewer page is not public and talks to nothing but its data and the API.
    ("ingress", "review", 8867, "TCP"),
    ("internet", "review", 8867, "TCP"),
    ("app", "review", 8867, "TCP"),
    ("api", "review", 8867, "TCP"),
    ("prometheus", "review", 8867, "TCP"),
    ("review", "mlflow", 5000, "TCP"),
    ("review", "airflow-api-server", 8080, "TCP"),
    # The backups reach their data, not the services.
    ("postgres-backup", "mlflow", 5000, "TCP"),
    ("object-store-backup", "api", 8000, "TCP"),
    ("app", "object-store-backup", 8080, "TCP"),
]


@pytest.fixture(scope="module", params=OVERLAYS)
def live(request: pytest.FixtureRequest, rendered: Objects) -> tuple[str, Cluster, dict]:
    overlay = request.param
    cluster, env = build(rendered[overlay], overlay, airflow_values(overlay))
    return overlay, cluster, env


def _check(cluster: Cluster, env: dict, flow: tuple) -> bool:
    src, dst, port, protocol = flow
    return cluster.allowed(
        env["pods"][src], env["pods"][dst], port_of(dst, env["ports"], port), protocol
    )


def test_required_flows_are_allowed(live: tuple[str, Cluster, dict]) -> None:
    overlay, cluster, env = live
    flows = REQUIRED + (DEV_ONLY if overlay == "dev" else [])
    blocked = [flow for flow in flows if not _check(cluster, env, flow)]
    assert not blocked, f"{overlay}: flows the architecture needs are blocked: {blocked}"


def test_unlisted_flows_are_denied(live: tuple[str, Cluster, dict]) -> None:
    overlay, cluster, env = live
    open_ = [flow for flow in DENIED if _check(cluster, env, flow)]
    assert not open_, f"{overlay}: flows outside the architecture are open: {open_}"


def test_prometheus_reaches_every_target_of_every_servicemonitor(
    live: tuple[str, Cluster, dict], rendered: Objects
) -> None:
    """Derived from the rendered ServiceMonitors (not a hand list): each endpoint's Service,
    port and backing pods, the chart's statsd Service included."""
    overlay, cluster, env = live
    objs = rendered[overlay]
    monitors = [o for o in objs if o["kind"] == "ServiceMonitor"]
    ns = monitors[0]["metadata"]["namespace"]
    services = [o for o in objs if o["kind"] == "Service"] + chart_services(ns)
    pods = [p for p in env["pods"].values() if isinstance(p, Pod)]
    targets = scrape_targets(monitors, services, pods)
    assert {m["metadata"]["name"] for m in monitors} <= {t[0] for t in targets}
    assert len(monitors) >= 3
    blocked = [
        (name, pod.name, port)
        for name, pod, port in targets
        if not cluster.allowed(env["pods"]["prometheus"], pod, port)
    ]
    assert not blocked, f"{overlay}: Prometheus cannot scrape {blocked}"


def test_every_pod_of_ours_is_isolated_for_ingress(live: tuple[str, Cluster, dict]) -> None:
    """The default deny reaches every pod in the namespace, the chart's pods included."""
    overlay, cluster, env = live
    for name, pod in env["pods"].items():
        if isinstance(pod, Pod) and pod.namespace.startswith("dandelion"):
            assert not cluster.allowed(INTERNET, pod, 12345), f"{overlay}: {name} is not isolated"


def test_no_pod_reaches_the_reviewer_page(live: tuple[str, Cluster, dict]) -> None:
    """Derived from every modelled pod (not a hand list): none, in the namespace or outside it,
    may connect to the reviewer page, on its port or any other."""
    overlay, cluster, env = live
    review = env["pods"]["review"]
    assert [(name, number) for name, number, _ in review.ports] == [("http", 8867)]
    open_ = [
        (name, port)
        for name, src in env["pods"].items()
        if src is not review
        for port in (8867, 80, 443)
        if cluster.allowed(src, review, port)
    ]
    assert not open_, f"{overlay}: the reviewer page is reachable from {open_}"


def test_finding_2_without_an_api_server_ingress_rule_tasks_cannot_report(
    rendered: Objects,
) -> None:
    """Regression: the chart's api-server policy with no `from` (the former values) admits no
    one: the evaluator must see the task pods blocked, and our values must open them."""
    values = airflow_values("dev")
    values["apiServer"] = {k: v for k, v in values["apiServer"].items() if k != "networkPolicy"}
    cluster, env = build(rendered["dev"], "dev", values)
    assert not _check(cluster, env, ("airflow-task", "airflow-api-server", 8080, "TCP"))
    ours = load(AIRFLOW / "values.yaml")["apiServer"]["networkPolicy"]["ingress"]
    assert ours["from"] and ours["ports"]


# --- the evaluator itself -----------------------------------------------------------------------


def _np(spec: dict[str, Any], ns: str = "a") -> dict[str, Any]:
    return {"kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": ns}, "spec": spec}


def _cluster(*policies: dict[str, Any]) -> Cluster:
    cluster = Cluster()
    cluster.add_namespace("a", {"team": "x"})
    cluster.add_namespace("b", {"team": "y"})
    cluster.policies = list(policies)
    return cluster


WEB = Pod("web", "a", {"app": "web"}, (("http", 8080, "TCP"),))
CLIENT_A = Pod("client", "a", {"app": "client"})
CLIENT_B = Pod("client", "b", {"app": "client"})


def test_evaluator_no_policy_allows_and_empty_policy_denies() -> None:
    assert _cluster().allowed(CLIENT_A, WEB, 8080)
    deny = _np({"podSelector": {}, "policyTypes": ["Ingress"]})
    assert not _cluster(deny).allowed(CLIENT_A, WEB, 8080)
    assert _cluster(deny).allowed(WEB, CLIENT_B, 9999), "ingress isolation must not limit egress"
    egress_deny = _np({"podSelector": {}, "policyTypes": ["Egress"]})
    assert not _cluster(egress_deny).allowed(WEB, CLIENT_B, 9999)


def test_evaluator_policy_types_default_from_sections() -> None:
    only_egress_rules = _np({"podSelector": {}, "egress": [{"to": []}]})
    # No policyTypes: Ingress always, Egress because of the section -> ingress denied.
    assert not _cluster(only_egress_rules).allowed(CLIENT_A, WEB, 8080)
    assert _cluster(only_egress_rules).allowed(WEB, CLIENT_B, 1)


def test_evaluator_pod_and_namespace_selectors_and_vs_or() -> None:
    both = _np({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"team": "y"}},
         "podSelector": {"matchLabels": {"app": "client"}}}]}]})  # fmt: skip
    assert _cluster(both).allowed(CLIENT_B, WEB, 8080)
    assert not _cluster(both).allowed(CLIENT_A, WEB, 8080)
    pod_only = _np({"podSelector": {}, "ingress": [{"from": [
        {"podSelector": {"matchLabels": {"app": "client"}}}]}]})  # fmt: skip
    assert _cluster(pod_only).allowed(CLIENT_A, WEB, 8080)
    assert not _cluster(pod_only).allowed(CLIENT_B, WEB, 8080), "podSelector alone: own namespace"


def test_evaluator_ports_named_ranges_protocols() -> None:
    named = _np({"podSelector": {}, "ingress": [{"ports": [{"port": "http"}]}]})
    assert _cluster(named).allowed(CLIENT_A, WEB, 8080)
    assert not _cluster(named).allowed(CLIENT_A, WEB, 8081)
    assert not _cluster(named).allowed(CLIENT_A, WEB, 8080, "UDP")
    ranged = _np({"podSelector": {}, "ingress": [{"ports": [{"port": 8000, "endPort": 8100}]}]})
    assert _cluster(ranged).allowed(CLIENT_A, WEB, 8080)
    assert not _cluster(ranged).allowed(CLIENT_A, WEB, 8101)


def test_evaluator_ip_blocks_and_expressions() -> None:
    egress = _np({"podSelector": {"matchExpressions": [
        {"key": "app", "operator": "In", "values": ["client", "other"]}]},
        "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.9.0/24"]}}]}]})  # fmt: skip
    cluster = _cluster(egress)
    assert cluster.allowed(CLIENT_A, External("db", "10.0.1.1"), 5432)
    assert not cluster.allowed(CLIENT_A, External("db", "10.0.9.1"), 5432)
    assert not cluster.allowed(CLIENT_A, External("db", "192.168.0.1"), 5432)
    assert not cluster.allowed(CLIENT_A, WEB, 8080), "ipBlock never matches pods here"
    assert cluster.allowed(WEB, External("db", "192.168.0.1"), 5432), "web is not selected"
