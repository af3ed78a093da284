"""The pipeline (Airflow) image run the way the Airflow chart runs it on Kubernetes.

The container environment is derived from k8s/airflow/values.yaml (+ values-dev.yaml) and the
dev overlay's ConfigMap by deploy.k8s_env (executor, auth manager, config, env, extraEnvFrom,
uid, read-only root, emptyDir volumes as tmpfs), so this check and the chart cannot drift.
Real PostgreSQL (Debian's, stand-in for the managed database) and a real S3-protocol server
(moto, stand-in for MinIO) run as containers on a private docker network under the service
names the ConfigMap uses. The one fake: no Kubernetes API exists here, so the executor's
client is pointed at a kubeconfig whose server is a closed loopback port (the scheduler must
still start and heartbeat; task pods are what only a real cluster shows).

The probes and sidecars are the chart's own: the exact commands that the pinned chart version
(AIRFLOW_CHART_VERSION=1.22.0 in k8s/deploy.sh) renders for `airflowVersion` 3.x (CHART_* below),
run inside our image against the running component they check.

Run by `nox -s images` after the build (DANDELION_IMAGE_TESTS=1); skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy import dockerkit as dk
from deploy.k8s_env import AIRFLOW_CFG, AirflowContainer, airflow_container

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(
        os.environ.get("DANDELION_IMAGE_TESTS") != "1",
        reason="needs a Docker engine and the built images: run by `nox -s images`",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
GREENR = Path(os.environ.get("DANDELION_TEST_DATASET", ROOT.parent / "shared/datasets/greenr"))
STAND_INS = dk.STAND_INS_IMAGE
KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "http://kubernetes:8001"}}]
users: [{name: none, user: {token: none}}]
contexts: [{name: none, context: {cluster: none, user: none, namespace: dandelion-dev}}]
current-context: none
"""


def _chart_probe(check_args: str) -> list[str]:
    """An exec probe as apache-airflow chart 1.22.0 renders it (chart/templates/_helpers.yaml)."""
    return [
        "sh",
        "-c",
        "CONNECTION_CHECK_MAX_COUNT=0 AIRFLOW__LOGGING__LOGGING_LEVEL=ERROR exec /entrypoint \\\n"
        f"airflow jobs check {check_args}\n",
    ]


# Chart 1.22.0, airflowVersion >= 2.5.2 (ours: 3.x, k8s/airflow/values.yaml):
# - scheduler livenessProbe and startupProbe, chart/templates/scheduler/scheduler-deployment.yaml
#   (`scheduler_liveness_check_command`, `scheduler_startup_check_command` of _helpers.yaml);
# - triggerer livenessProbe, chart/templates/triggerer/triggerer-deployment.yaml
#   (`triggerer_liveness_check_command`);
# - dag-processor livenessProbe, chart/templates/dag-processor/dag-processor-deployment.yaml
#   (`dag_processor_liveness_check_command`: `--local` then `--job-type DagProcessorJob`).
CHART_PROBES = {
    "scheduler": _chart_probe("--job-type SchedulerJob --local"),
    "triggerer": _chart_probe("--job-type TriggererJob --local"),
    "dag-processor": _chart_probe("--local --job-type DagProcessorJob"),
}
# The log-groomer sidecars of the scheduler, triggerer, dag-processor and workers (same
# templates; `logGroomerSidecar.args` of the chart's values.yaml, on by default) and their env.
CHART_LOG_GROOMER = ["bash", "/clean-logs"]
CHART_LOG_GROOMER_ENV = {
    "AIRFLOW__LOG_RETENTION_DAYS": "15",
    "AIRFLOW__LOG_CLEANUP_FREQUENCY_MINUTES": "15",
}
# What the kubelet allows an exec probe before it counts as failed is timeoutSeconds (20 s in
# the chart for these probes); the check here waits longer on this shared machine and reports.
PROBE_WAIT_S = 180


@dataclass
class Cluster:
    network: str
    spec: AirflowContainer
    mounts: list[str]
    names: list[str]

    def airflow_args(self, name: str, *extra: str) -> list[str]:
        return [
            "--name",
            name,
            "--network",
            self.network,
            *self.spec.docker_args(),
            *self.mounts,
            *extra,
            dk.image_tag("pipeline"),
        ]


def _wait_exec(container: str, cmd: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if dk.docker("exec", container, *cmd, check=False).returncode == 0:
            return
        time.sleep(1.0)
    raise AssertionError(f"{container}: {cmd} never succeeded\n{dk.container_logs(container)}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    tag = uuid.uuid4().hex[:8]
    network = f"dandelion-k8s-{tag}"
    names: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="dandelion-k8s-"))
    dk.docker("network", "create", network)
    try:
        pw = {k: secrets.token_hex(12) for k in ("postgres", "airflow", "s3key", "s3secret")}
        pg, s3, kube = f"k8s-postgres-{tag}", f"k8s-minio-{tag}", f"k8s-kube-api-{tag}"
        names += [pg, s3, kube]
        fake = Path(__file__).with_name("fake_kube_api.py")
        dk.docker(
            "run", "-d", "--name", kube, "--network", network, "--network-alias", "kubernetes",
            "-v", f"{fake}:/fake_kube_api.py:ro", STAND_INS, "python", "/fake_kube_api.py", "8001",
        )  # fmt: skip
        init = ROOT / "k8s/overlays/dev/postgres/init-databases.sh"
        dk.docker(
            "run", "-d", "--name", pg, "--network", network, "--network-alias", "postgres",
            "-e", f"POSTGRES_PASSWORD={pw['postgres']}", "-e", f"AIRFLOW_DB_PASSWORD={pw['airflow']}",
            "-e", "MLFLOW_DB_PASSWORD=unused-here", "-e", "FEEDBACK_DB_PASSWORD=unused-here",
            "-v", f"{init}:/docker-entrypoint-initdb.d/10-init-databases.sh:ro",
            "--entrypoint", "postgres-entrypoint", STAND_INS,
        )  # fmt: skip
        dk.docker(
            "run", "-d", "--name", s3, "--network", network, "--network-alias", "minio",
            "-e", f"S3_ACCESS_KEY_ID={pw['s3key']}", "-e", f"S3_SECRET_ACCESS_KEY={pw['s3secret']}",
            "-e", "S3_ENDPOINT_URL=http://127.0.0.1:9000",
            STAND_INS, "moto_server", "-H", "0.0.0.0", "-p", "9000",
        )  # fmt: skip
        # The tracking server the ConfigMap names (our MLflow image; SQLite backend in its tmpfs).
        mlflow = f"k8s-mlflow-{tag}"
        names.append(mlflow)
        dk.docker(
            "run", "-d", "--name", mlflow, "--network", network, "--network-alias", "mlflow",
            "--read-only", "--tmpfs", "/tmp",
            "-e", "MLFLOW_BACKEND_STORE_URI=sqlite:////tmp/mlflow.db",
            "-e", "MLFLOW_ARTIFACTS_DESTINATION=s3://mlflow",
            "-e", "MLFLOW_S3_ENDPOINT_URL=http://minio:9000",
            "-e", "MLFLOW_SERVER_ALLOWED_HOSTS=mlflow,mlflow:5000,localhost:5000,127.0.0.1:5000",
            "-e", f"AWS_ACCESS_KEY_ID={pw['s3key']}", "-e", f"AWS_SECRET_ACCESS_KEY={pw['s3secret']}",
            "-e", "AWS_DEFAULT_REGION=us-east-1",
            dk.image_tag("mlflow"),
        )  # fmt: skip
        _wait_exec(pg, ["pg_isready", "-h", "127.0.0.1", "-U", "postgres"], 120)
        _wait_exec(s3, ["python", "/usr/local/bin/s3-init", "dandelion", "mlflow"], 60)
        db = f"airflow:{pw['airflow']}@postgres:5432/airflow"
        spec = airflow_container(
            {
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg://{db}",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": f"postgresql+psycopg_async://{db}",
                "AIRFLOW__CORE__FERNET_KEY": "Xr8wJ2dJxmSg3m6tYc0a9m4sI1o2Y6wJ3x8bQv7Lk0E=",
                "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
                "AWS_ACCESS_KEY_ID": pw["s3key"],
                "AWS_SECRET_ACCESS_KEY": pw["s3secret"],
            }
        )
        # What the chart renders from templates (service URL) and the one fake (see above).
        spec.env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] = (
            "http://airflow-api-server:8080/execution/"
        )
        spec.env["AIRFLOW__KUBERNETES_EXECUTOR__IN_CLUSTER"] = "False"
        spec.env["AIRFLOW__KUBERNETES_EXECUTOR__CONFIG_FILE"] = "/etc/dandelion-test/kubeconfig"
        (tmp / "airflow.cfg").write_text(spec.airflow_cfg)
        (tmp / "kubeconfig").write_text(KUBECONFIG)
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        mounts = [
            "-v", f"{tmp / 'airflow.cfg'}:{AIRFLOW_CFG}:ro",
            "-v", f"{tmp / 'kubeconfig'}:/etc/dandelion-test/kubeconfig:ro",
        ]  # fmt: skip
        c = Cluster(network, spec, mounts, names)
        migrate = dk.docker(
            "run", "--rm", *c.airflow_args(f"k8s-migrate-{tag}"), "airflow", "db", "migrate",
            check=False, timeout=600,
        )  # fmt: skip
        assert migrate.returncode == 0, (migrate.stdout + migrate.stderr)[-4000:]
        yield c
    finally:
        for name in names:
            dk.docker("rm", "-f", "-v", name, check=False)
        dk.docker("network", "rm", network, check=False)


def test_values_declare_what_the_image_needs(cluster: Cluster) -> None:
    spec = cluster.spec
    assert spec.uid == 50000
    assert "KubernetesExecutor" in spec.airflow_cfg
    assert "FabAuthManager" in spec.airflow_cfg
    assert spec.read_only, "values: Airflow containers must declare readOnlyRootFilesystem"
    workdir = spec.env.get("DANDELION_WORKDIR", "")
    assert workdir in spec.tmpfs, f"DANDELION_WORKDIR={workdir} is not on a writable volume"
    assert "/tmp" in spec.tmpfs, "a read-only root needs a writable /tmp volume"


def test_scheduler_and_api_server_start(cluster: Cluster) -> None:
    tag = cluster.network.rsplit("-", 1)[1]
    sched, api = f"k8s-scheduler-{tag}", f"k8s-api-server-{tag}"
    cluster.names += [sched, api]
    dk.docker("run", "-d", *cluster.airflow_args(sched), "airflow", "scheduler")
    dk.docker(
        "run", "-d", "-p", "127.0.0.1::8080",
        *cluster.airflow_args(api, "--network-alias", "airflow-api-server"),
        "airflow", "api-server", "--port", "8080",
    )  # fmt: skip
    port = dk.published_port(api, 8080)
    health_url = f"http://127.0.0.1:{port}/api/v2/monitor/health"
    deadline = time.monotonic() + 300
    health: dict[str, dict[str, str]] = {}
    while time.monotonic() < deadline:
        for name in (sched, api):
            assert dk.inspect(name)["State"]["Running"], f"{name} exited\n{dk.container_logs(name)}"
        try:
            with urllib.request.urlopen(health_url, timeout=5) as resp:
                health = json.load(resp)
            if health.get("scheduler", {}).get("status") == "healthy":
                break
        except OSError:
            pass
        time.sleep(2.0)
    assert health.get("metadatabase", {}).get("status") == "healthy", (
        f"{health}\n{dk.container_logs(api)}"
    )
    assert health.get("scheduler", {}).get("status") == "healthy", (
        f"{health}\n{dk.container_logs(sched)}"
    )
    # FAB: a user created with its CLI logs in and gets a token for the REST API.
    user = dk.docker(
        "exec", api, "airflow", "users", "create", "--role", "Admin", "--username", "ops",
        "--password", "ops-pass-123", "--firstname", "O", "--lastname", "P", "--email", "o@p.q",
        check=False, timeout=300,
    )  # fmt: skip
    assert user.returncode == 0, (user.stdout + user.stderr)[-3000:]
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/auth/token",
        data=json.dumps({"username": "ops", "password": "ops-pass-123"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        token = json.load(resp)["access_token"]
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v2/version", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert json.load(resp)["version"].startswith("3.")


def test_notebook_task_runs(cluster: Cluster) -> None:
    tag = cluster.network.rsplit("-", 1)[1]
    name = f"k8s-task-{tag}"
    cluster.names.append(name)
    proc = dk.docker(
        "run", "--rm",
        *cluster.airflow_args(
            name, "-v", f"{GREENR}:/data/greenr:ro",
            "-e", "DANDELION_SOURCE=/data/greenr", "-e", "DANDELION_MAX_PER_CLASS=6",
            # The ConfigMap's negatives bucket is not seeded in this stand-in store.
            "-e", "DANDELION_NEGATIVES_SOURCE=",
        ),
        "airflow", "tasks", "test", "dandelion_pipeline", "ingest",
        check=False, timeout=900,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    # The dataset version landed in the S3 store the ConfigMap names.
    s3 = next(n for n in cluster.names if n.startswith("k8s-minio-"))
    listing = dk.docker(
        "exec", "-e", "AWS_ACCESS_KEY_ID=x", "-e", "AWS_SECRET_ACCESS_KEY=x", s3, "python", "-c",
        "import boto3,os; c=boto3.client('s3',endpoint_url='http://127.0.0.1:9000',"
        "region_name='us-east-1'); print(c.list_objects_v2(Bucket='dandelion').get('KeyCount',0))",
    )  # fmt: skip
    assert int(listing.stdout.strip().splitlines()[-1]) >= 12, listing.stdout


def _run_probe(container: str, command: list[str]) -> tuple[int, float, str]:
    start = time.monotonic()
    proc = dk.docker("exec", container, *command, check=False, timeout=PROBE_WAIT_S)
    return proc.returncode, time.monotonic() - start, proc.stdout + proc.stderr


def _start(cluster: Cluster, component: str, *command: str) -> str:
    """The named Airflow component of this cluster, started unless it already runs."""
    tag = cluster.network.rsplit("-", 1)[1]
    name = f"k8s-{component}-{tag}"
    if dk.docker("inspect", name, check=False).returncode != 0:
        cluster.names.append(name)
        dk.docker("run", "-d", *cluster.airflow_args(name), *command)
    return name


def test_chart_probes_pass_against_running_components(cluster: Cluster) -> None:
    """The chart's probe commands in our image: each fails while its component is not running
    (the probe can fail), and passes once it heartbeats."""
    probe = f"k8s-probe-{cluster.network.rsplit('-', 1)[1]}"
    cluster.names.append(probe)
    dk.docker("run", "-d", *cluster.airflow_args(probe), "sleep", "infinity")
    code, _, out = _run_probe(probe, CHART_PROBES["triggerer"])
    assert code != 0, f"triggerer probe passed with no triggerer running:\n{out}"

    components = {
        "scheduler": _start(cluster, "scheduler", "airflow", "scheduler"),
        "triggerer": _start(cluster, "triggerer", "airflow", "triggerer"),
        "dag-processor": _start(cluster, "dag-processor", "airflow", "dag-processor"),
    }
    deadline = time.monotonic() + 420
    pending = dict(components)
    took: dict[str, float] = {}
    last: dict[str, str] = {}
    while pending and time.monotonic() < deadline:
        for component, name in list(pending.items()):
            assert dk.inspect(name)["State"]["Running"], f"{name} exited\n{dk.container_logs(name)}"
            code, seconds, out = _run_probe(name, CHART_PROBES[component])
            last[component] = out
            if code == 0:
                took[component] = seconds
                del pending[component]
        time.sleep(3.0)
    assert not pending, {
        c: (last.get(c, ""), dk.container_logs(n)[-3000:]) for c, n in pending.items()
    }
    print("chart probes passed, seconds per probe:", {c: round(t, 1) for c, t in took.items()})


def test_chart_log_groomer_sidecar(cluster: Cluster, tmp_path: Path) -> None:
    """`bash /clean-logs` as the chart's sidecar: deletes old task logs, keeps recent ones and
    other files, keeps running, and stops at once on SIGTERM."""
    logs = tmp_path / "logs"
    old = logs / "dag_id=dandelion_pipeline" / "run_id=old" / "task_id=ingest" / "attempt=1.log"
    recent = logs / "dag_id=dandelion_pipeline" / "run_id=new" / "task_id=ingest" / "attempt=1.log"
    other = logs / "scheduler" / "latest"
    for path in (old, recent, other):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("log line\n")
    month_ago = time.time() - 30 * 86400
    os.utime(old, (month_ago, month_ago))
    for folder in [logs, *logs.rglob("*")]:
        if folder.is_dir():
            folder.chmod(0o777)
    # The chart mounts the logs volume there instead of the emptyDir the values give it.
    args = cluster.spec.docker_args()
    args = [a for i, a in enumerate(args) if not _is_logs_tmpfs(args, i)]
    name = f"k8s-log-groomer-{cluster.network.rsplit('-', 1)[1]}"
    cluster.names.append(name)
    env = [x for k, v in CHART_LOG_GROOMER_ENV.items() for x in ("-e", f"{k}={v}")]
    dk.docker(
        "run", "-d", "--name", name, *args, *env, "-v", f"{logs}:/opt/airflow/logs",
        dk.image_tag("pipeline"), *CHART_LOG_GROOMER,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    # The file goes first, its emptied folders in the same pass a moment later.
    while old.parent.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not old.exists(), dk.container_logs(name)
    assert not old.parent.exists(), "the emptied folders stay"
    assert recent.exists() and other.exists()
    assert dk.inspect(name)["State"]["Running"], dk.container_logs(name)
    dk.docker("stop", "--time", "10", name)
    state = dk.inspect(name)["State"]
    assert state["ExitCode"] == 0, (state, dk.container_logs(name))


def _is_logs_tmpfs(args: list[str], i: int) -> bool:
    """args[i] is the emptyDir tmpfs of /opt/airflow/logs or its `--tmpfs` flag."""
    if args[i] == "--tmpfs":
        return i + 1 < len(args) and args[i + 1].startswith("/opt/airflow/logs:")
    return args[i].startswith("/opt/airflow/logs:") and i > 0 and args[i - 1] == "--tmpfs"
