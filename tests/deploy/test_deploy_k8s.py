"""Kubernetes manifests: every overlay renders, validates for the stated Kubernetes version, and
has what production needs (probes, resources, hardening, HPA, PDB, policies, monitoring)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from deploy_support import (
    KUBERNETES_VERSION,
    LONG_RUNNING_KINDS,
    OVERLAYS,
    ROOT,
    containers,
    find,
    load_all,
    pod_labels,
    pod_spec,
    workloads,
)

Objects = dict[str, list[dict[str, Any]]]
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}  # not in the Kubernetes schemas; checked below
SECRET_TEMPLATES = ROOT / "k8s" / "secrets" / "secrets.example.yaml"
DEV_SECRETS_SCRIPT = ROOT / "k8s" / "secrets" / "create-dev-secrets.sh"


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def secret_keys() -> dict[str, set[str]]:
    return {
        doc["metadata"]["name"]: set(doc["stringData"])
        for doc in load_all(SECRET_TEMPLATES.read_text())
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_kubernetes_schemas(rendered: Objects, overlay: str) -> None:
    import kubernetes_validate

    errors = []
    for obj in rendered[overlay]:
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    assert not errors, "\n".join(errors)
    assert len(rendered[overlay]) >= 20


def test_secret_templates_validate_and_are_not_rendered(rendered: Objects) -> None:
    import kubernetes_validate

    for doc in load_all(SECRET_TEMPLATES.read_text()):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        assert all("<" in v for v in doc["stringData"].values()), "placeholders only"
    for overlay, objs in rendered.items():
        assert not [o for o in objs if o["kind"] == "Secret"], f"{overlay} renders a Secret"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespaced_and_no_default_namespace(rendered: Objects, overlay: str) -> None:
    namespaces = {o["metadata"]["name"] for o in rendered[overlay] if o["kind"] == "Namespace"}
    assert len(namespaces) == 1
    for obj in rendered[overlay]:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") in namespaces, obj["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_latest_and_pinned_images(rendered: Objects, overlay: str) -> None:
    for obj in workloads(rendered[overlay]):
        for c in containers(obj):
            image = c["image"]
            name, _, tag = image.rpartition(":")
            assert name and tag and tag != "latest", f"{obj['metadata']['name']}: {image}"
            assert "@sha256:" in image or any(ch.isdigit() for ch in tag), image


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_limits_and_probes(rendered: Objects, overlay: str) -> None:
    for obj in workloads(rendered[overlay]):
        for c in containers(obj):
            where = f"{obj['kind']}/{obj['metadata']['name']}/{c['name']}"
            resources = c.get("resources", {})
            for section in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in resources.get(section, {}), f"{where}: {section}.{resource}"
            if obj["kind"] in LONG_RUNNING_KINDS:
                assert "livenessProbe" in c and "readinessProbe" in c, f"{where}: probes"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_hardened(rendered: Objects, overlay: str) -> None:
    for obj in workloads(rendered[overlay]):
        pod = pod_spec(obj)
        assert pod.get("automountServiceAccountToken") is False, obj["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in containers(obj):
            sc = c["securityContext"]
            where = f"{obj['metadata']['name']}/{c['name']}"
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc["runAsNonRoot"] is True, where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_deployment(rendered: Objects, overlay: str) -> None:
    api = find(rendered[overlay], "Deployment", "api")
    (c,) = api["spec"]["template"]["spec"]["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["startupProbe"]["httpGet"]["path"] == "/health/live"
    assert c["ports"][0]["containerPort"] == 8000
    env = {e["name"]: e for e in c["env"]}
    # Credentials only by reference to Secrets that the templates define, with those keys.
    keys = secret_keys()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "DANDELION_FEEDBACK_DB_URL",
                 "DANDELION_ADMIN_TOKEN"):  # fmt: skip
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["key"] in keys[ref["name"]], name
    assert c["envFrom"] == [{"configMapRef": {"name": "dandelion-config"}}]
    config = find(rendered[overlay], "ConfigMap", "dandelion-config")["data"]
    assert config["DANDELION_API_HOST"] == "0.0.0.0"
    assert config["DANDELION_TRACKING_URI"] == "http://mlflow:5000"


def test_external_services_in_prod_and_in_cluster_in_dev(rendered: Objects) -> None:
    dev, prod = rendered["dev"], rendered["prod"]
    for name in ("minio", "postgres"):
        sts = find(dev, "StatefulSet", name)
        assert sts["spec"]["volumeClaimTemplates"], f"{name} needs a PVC"
        assert not [o for o in prod if o["metadata"]["name"] == name]
    dev_config = find(dev, "ConfigMap", "dandelion-config")["data"]
    prod_config = find(prod, "ConfigMap", "dandelion-config")["data"]
    assert dev_config["DANDELION_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "DANDELION_S3_ENDPOINT_URL" not in prod_config
    assert "MLFLOW_S3_ENDPOINT_URL" not in prod_config
    assert prod_config["DANDELION_STORE_URL"].startswith("s3://")
    ingress_tls = [o for o in prod if o["kind"] == "Ingress" and o["spec"].get("tls")]
    assert len(ingress_tls) == 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_scales_api_on_cpu_and_requests_per_second(rendered: Objects, overlay: str) -> None:
    hpa = find(rendered[overlay], "HorizontalPodAutoscaler", "api")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "api"}  # fmt: skip
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "dandelion_http_requests_per_second"
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    adapter = (ROOT / "k8s" / "monitoring" / "prometheus-adapter-values.yaml").read_text()
    assert 'as: "dandelion_http_requests_per_second"' in adapter
    assert "dandelion_http_requests_total" in adapter
    if overlay == "prod":
        assert hpa["spec"]["minReplicas"] >= 3


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pdbs_select_running_pods(rendered: Objects, overlay: str) -> None:
    objs = rendered[overlay]
    pdbs = [o for o in objs if o["kind"] == "PodDisruptionBudget"]
    assert {p["metadata"]["name"] for p in pdbs} >= {"api"}
    for pdb in pdbs:
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(selects(selector, pod_labels(w)) for w in workloads(objs)), pdb["metadata"][
            "name"
        ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_covered_by_a_network_policy(rendered: Objects, overlay: str) -> None:
    objs = rendered[overlay]
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    assert any(p["spec"]["podSelector"] == {} for p in policies), "default deny missing"
    for w in workloads(objs):
        labels = pod_labels(w)
        specific = [
            p
            for p in policies
            if p["spec"]["podSelector"].get("matchLabels")
            and selects(p["spec"]["podSelector"]["matchLabels"], labels)
        ]
        if w["kind"] in LONG_RUNNING_KINDS:
            assert specific, f"no NetworkPolicy opens {w['metadata']['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_and_ingresses_resolve(rendered: Objects, overlay: str) -> None:
    objs = rendered[overlay]
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    for svc in services.values():
        selector = svc["spec"]["selector"]
        backends = [w for w in workloads(objs) if selects(selector, pod_labels(w))]
        assert backends, f"Service {svc['metadata']['name']} selects no pods"
        port_names = {p.get("name") for w in backends for c in containers(w) for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, (svc["metadata"]["name"], port)
    hosts = set()
    for ing in (o for o in objs if o["kind"] == "Ingress"):
        for rule in ing["spec"]["rules"]:
            hosts.add(rule["host"])
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                svc = services[backend["name"]]
                assert backend["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]}
    assert {h.split(".")[0] for h in hosts} == {"api", "app"}, "only the API and the app are public"


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", ["api", "mlflow"])
def test_servicemonitors_scrape_the_api_and_mlflow(
    rendered: Objects, overlay: str, service: str
) -> None:
    objs = rendered[overlay]
    sm = find(objs, "ServiceMonitor", service)
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    svc = find(objs, "Service", service)
    assert selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
    if service == "mlflow":  # /metrics exists only with --expose-prometheus
        (container,) = find(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
        assert "--expose-prometheus" in container["args"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_referenced_configmaps_and_secrets_exist(rendered: Objects, overlay: str) -> None:
    objs = rendered[overlay]
    configmaps = {
        o["metadata"]["name"]: o.get("data", {}) for o in objs if o["kind"] == "ConfigMap"
    }
    keys = secret_keys()
    for w in workloads(objs):
        pod = pod_spec(w)
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps
        for c in containers(w):
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    assert src["configMapRef"]["name"] in configmaps
            for env in c.get("env", []):
                ref = env.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    name, key = ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]
                    assert key in keys.get(name, set()), f"secret {name}/{key} has no template"
                if "configMapKeyRef" in ref and not ref["configMapKeyRef"].get("optional"):
                    cm = ref["configMapKeyRef"]
                    assert cm["key"] in configmaps[cm["name"]], cm


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_image_mapping_controls_the_deployed_images(overlay: str, tmp_path: Path) -> None:
    """CD pins images by editing the overlay's `images:` (kustomize edit set image): that edit
    must reach every project container, so the base must leave the short names unmapped."""
    import shutil

    import yaml
    from deploy_support import run, tool

    copy = tmp_path / "k8s"
    shutil.copytree(ROOT / "k8s", copy)
    kustomization = copy / "overlays" / overlay / "kustomization.yaml"
    data = yaml.safe_load(kustomization.read_text())
    digest = "sha256:" + "ab" * 32
    for image in data["images"]:
        image.pop("newTag", None)
        image["digest"] = digest
    kustomization.write_text(yaml.safe_dump(data))
    proc = run(tool("kubectl"), "kustomize", str(copy / "overlays" / overlay))
    assert proc.returncode == 0, proc.stderr
    project = [
        c["image"]
        for w in workloads(load_all(proc.stdout))
        for c in containers(w)
        if "/dandelion-" in c["image"] or c["image"].startswith("dandelion-")
    ]
    assert len(project) == 5  # api, app, the reviewer page (app image), mlflow, mlflow's Job
    assert all(image.endswith("@" + digest) and "ghcr.io/" in image for image in project), project


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_finding_8_no_replicas_on_hpa_managed_deployments(rendered: Objects, overlay: str) -> None:
    """Under server-side apply, a `replicas` in the manifest is re-applied on every deploy and
    fights the HPA: the Deployments an HPA scales leave the field to it."""
    objs = rendered[overlay]
    hpas = [o for o in objs if o["kind"] == "HorizontalPodAutoscaler"]
    assert hpas
    for hpa in hpas:
        target = hpa["spec"]["scaleTargetRef"]
        deployment = find(objs, target["kind"], target["name"])
        assert "replicas" not in deployment["spec"], f"{target['name']} sets replicas"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_public_api_is_rate_limited_at_the_ingress(rendered: Objects, overlay: str) -> None:
    annotations = find(rendered[overlay], "Ingress", "api")["metadata"]["annotations"]
    assert int(annotations["nginx.ingress.kubernetes.io/limit-rps"]) > 0
    assert int(annotations["nginx.ingress.kubernetes.io/limit-connections"]) > 0
    assert int(annotations["nginx.ingress.kubernetes.io/limit-burst-multiplier"]) >= 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_rule_is_monitoring_alerts_yml(rendered: Objects, overlay: str) -> None:
    """monitoring/alerts.yml is the single source; the PrometheusRule carries the same groups
    (generated by monitoring/generate_prometheus_rule.py) and is selected like the monitors."""
    import yaml

    rule = find(rendered[overlay], "PrometheusRule", "dandelion-alerts")
    source = yaml.safe_load((ROOT / "monitoring" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == source["groups"]
    api_monitor = find(rendered[overlay], "ServiceMonitor", "api")
    assert rule["metadata"]["labels"]["release"] == api_monitor["metadata"]["labels"]["release"]
    from deploy_support import run

    proc = run(sys.executable, str(ROOT / "monitoring" / "generate_prometheus_rule.py"), "--check")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_airflow_statsd_is_scraped_as_statsd_exporter(rendered: Objects, overlay: str) -> None:
    """The chart's statsd Service (chart templates/statsd/statsd-service.yaml: labels tier=airflow,
    component=statsd, release=<release>; port statsd-scrape) under the job name the alert rules
    use (`statsd-exporter`)."""
    monitor = find(rendered[overlay], "ServiceMonitor", "airflow-statsd")
    assert monitor["spec"]["selector"]["matchLabels"] == {
        "tier": "airflow", "component": "statsd", "release": "airflow"}  # fmt: skip
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "statsd-scrape" and endpoint["path"] == "/metrics"
    (relabel,) = endpoint["relabelings"]
    assert relabel["targetLabel"] == "job" and relabel["replacement"] == "statsd-exporter"
    alerts = (ROOT / "monitoring" / "alerts.yml").read_text()
    assert 'job=~"statsd-exporter' in alerts


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_schema_job_runs_the_servers_image_and_script(
    rendered: Objects, overlay: str
) -> None:
    objs = rendered[overlay]
    job = find(objs, "Job", "mlflow-db-upgrade")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    (server,) = find(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == server["image"]
    backend = {e["name"]: e for e in container["env"]}["MLFLOW_BACKEND_STORE_URI"]
    assert backend == {e["name"]: e for e in server["env"]}["MLFLOW_BACKEND_STORE_URI"]
    (scripts,) = [v for v in job["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    configmap = find(objs, "ConfigMap", scripts["configMap"]["name"])
    script = configmap["data"]["db-upgrade.sh"]
    assert 'mlflow db upgrade "$MLFLOW_BACKEND_STORE_URI"' in script
    assert job["spec"]["activeDeadlineSeconds"] <= 600


def _selected_pods(objs: list[dict[str, Any]], selector: dict[str, str]) -> set[str]:
    return {w["metadata"]["name"] for w in workloads(objs) if selects(selector, pod_labels(w))}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_reviewer_page_deployment(rendered: Objects, overlay: str) -> None:
    """The reviewer page: one pod of the app's image running `dashboards.serve --review` on
    8867 (bound to 0.0.0.0 in the pod), probes on the kernel-free, token-free health paths, the
    token and the database URL from Secrets the templates define, the store from the ConfigMap."""
    objs = rendered[overlay]
    review = find(objs, "Deployment", "review")
    assert review["spec"]["replicas"] == 1
    pod = review["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    (app,) = find(objs, "Deployment", "app")["spec"]["template"]["spec"]["containers"]
    assert c["image"] == app["image"]
    assert c["command"] == ["python", "-m", "dashboards.serve", "--review"]
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [("http", 8867)]
    assert c["startupProbe"]["httpGet"]["path"] == "/health/live"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert {c[p]["httpGet"]["port"] for p in c if p.endswith("Probe")} == {"http"}
    assert c["securityContext"] == app["securityContext"]
    assert (
        pod["securityContext"]
        == find(objs, "Deployment", "app")["spec"]["template"]["spec"]["securityContext"]
    )
    env = {e["name"]: e for e in c["env"]}
    assert env["DANDELION_REVIEW_HOST"]["value"] == "0.0.0.0"
    assert env["DANDELION_REVIEW_PORT"]["value"] == "8867"
    keys = secret_keys()
    for name in ("DANDELION_REVIEW_TOKEN", "DANDELION_FEEDBACK_DB_URL", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY"):  # fmt: skip
        assert set(env[name]) == {"name", "valueFrom"}, f"{name}: only from a Secret"
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["key"] in keys[ref["name"]], name
    assert env["DANDELION_REVIEW_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "dandelion-review", "key": "token"}  # fmt: skip
    api_env = {e["name"]: e for e in find(objs, "Deployment", "api")["spec"]["template"]["spec"][
        "containers"][0]["env"]}  # fmt: skip
    assert env["DANDELION_FEEDBACK_DB_URL"] == api_env["DANDELION_FEEDBACK_DB_URL"]
    assert c["envFrom"] == [{"configMapRef": {"name": "dandelion-config"}}]
    # DANDELION_WORKDIR (ConfigMap) is a mounted emptyDir: the root file system is read-only.
    config = find(objs, "ConfigMap", "dandelion-config")["data"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {config["DANDELION_WORKDIR"], "/tmp"} <= mounts
    assert config["DANDELION_API_URL"] == "http://api:8000"  # the maps of where it looked
    service = find(objs, "Service", "review")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8867, "targetPort": "http", "protocol": "TCP"}
    ]
    assert _selected_pods(objs, service["spec"]["selector"]) == {"review"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_reviewer_page_is_not_public(rendered: Objects, overlay: str) -> None:
    """No Ingress routes to the reviewer page (by Service name or by a Service that selects its
    pod), no Service exposes it outside the cluster, and its NetworkPolicy has no ingress rule."""
    objs = rendered[overlay]
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    ingresses = [o for o in objs if o["kind"] == "Ingress"]
    assert ingresses
    for ing in ingresses:
        backends = [
            path["backend"]["service"]["name"]
            for rule in ing["spec"]["rules"]
            for path in rule["http"]["paths"]
        ]
        if "defaultBackend" in ing["spec"]:
            backends.append(ing["spec"]["defaultBackend"]["service"]["name"])
        for name in backends:
            assert name != "review", f"Ingress {ing['metadata']['name']} routes to review"
            pods = _selected_pods(objs, services[name]["spec"]["selector"])
            assert "review" not in pods, f"Ingress {ing['metadata']['name']} reaches review"
    for svc in services.values():
        if "review" in _selected_pods(objs, svc["spec"]["selector"]):
            assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", svc["metadata"]["name"]
            assert not svc["spec"].get("externalIPs"), svc["metadata"]["name"]
    policy = find(objs, "NetworkPolicy", "review")
    assert "Ingress" in policy["spec"]["policyTypes"]
    assert not policy["spec"].get("ingress"), "the reviewer page admits no pod"


def test_dev_secrets_script_creates_every_referenced_secret(rendered: Objects) -> None:
    """Every Secret a dev workload reads is created by create-dev-secrets.sh, the reviewer
    page's token with a fresh random value (never a literal)."""
    script = DEV_SECRETS_SCRIPT.read_text()
    referenced = {
        env["valueFrom"]["secretKeyRef"]["name"]
        for w in workloads(rendered["dev"])
        for c in containers(w)
        for env in c.get("env", [])
        if "secretKeyRef" in env.get("valueFrom", {})
    }
    assert "dandelion-review" in referenced
    for name in sorted(referenced):
        assert f"create {name} " in script, f"create-dev-secrets.sh does not create {name}"
    assert 'create dandelion-review --from-literal=token="$(rand)"' in script
