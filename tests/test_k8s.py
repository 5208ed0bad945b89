"""The Kubernetes manifests (deploy/k8s): rendered as `kubectl kustomize` renders them, every
object is valid against the Kubernetes schemas (offline, kubernetes-validate), the production
policies hold (non-root numeric UID, read-only root, no capabilities, limits, probes, a
PodDisruptionBudget per Deployment, secrets only from Secrets), the flags and ports agree with
the binaries, and the Redis, worker and balancer containers run locally as their manifests say."""

import copy
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import requests
import yaml

from fleet_harness import BIN_DIR, Client, Proc, free_port, port_open, wait_until

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUBECTL = shutil.which("kubectl")
VARIANTS = ["", "ingress", "prometheus-operator", "chat"]  # directories under deploy/k8s
KINDS_WITH_SCHEMAS = ["", "ingress", "chat"]  # prometheus-operator holds CRD objects only
SCHEMA_VERSIONS = ["1.29.0", "1.37.0"]  # the oldest and newest the pinned kubernetes-validate knows

try:
    import kubernetes_validate
except ImportError:  # tests/run installs it (tests/requirements.txt)
    kubernetes_validate = None


# --- rendering -------------------------------------------------------------------------------

def render_py(directory):
    """`kustomize build` for the features deploy/k8s uses (resources: files and directories;
    images; patches: strategic merge of maps), for machines without kubectl."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - {"apiVersion", "kind", "resources", "images", "patches"}
    assert not unknown, f"{directory}: render_py does not know {unknown}; extend it"
    objects = []
    for r in k.get("resources", []):
        path = (directory / r).resolve()
        objects += render_py(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    # Patches before images, as kustomize orders its transformers.
    for patch in k.get("patches", []):
        p = yaml.safe_load((directory / patch["path"]).read_text())
        target = next(o for o in objects if key(o) == key(p))
        _merge(target, p)
    for image in k.get("images", []):
        for c in (c for o in objects for c in containers(o)):
            name, _, tag = c["image"].partition(":")
            if name == image["name"]:
                c["image"] = f'{image.get("newName", name)}:{image.get("newTag", tag or "latest")}'
    return objects


def _merge(into, patch):
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = copy.deepcopy(v)


def render(variant):
    directory = K8S / variant
    if KUBECTL:
        out = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    return render_py(directory)


def key(o):
    return (o["kind"], o["metadata"]["name"])


def by_key(objects):
    return {key(o): o for o in objects}


def pod_spec(o):
    return o["spec"]["template"]["spec"] if o["kind"] == "Deployment" else None


def containers(o):
    spec = pod_spec(o) if o.get("kind") == "Deployment" else None
    return (spec or {}).get("containers", []) + (spec or {}).get("initContainers", [])


@pytest.fixture(scope="module")
def base():
    return by_key(render(""))


def fleet_file(objects):
    return yaml.safe_load(objects[("ConfigMap", "fleet-balancer")]["data"]["fleet.yaml"])


def secret_value(objects, ref):
    return objects[("Secret", ref["name"])]["stringData"][ref["key"]]


# --- rendering and schemas -------------------------------------------------------------------

@pytest.mark.skipif(not KUBECTL, reason="kubectl not installed: the Python rendering is used alone")
@pytest.mark.parametrize("variant", VARIANTS)
def test_python_rendering_matches_kubectl(variant):
    """The fallback renderer used where kubectl is missing gives what kubectl gives."""
    assert by_key(render_py(K8S / variant)) == by_key(render(variant))


@pytest.mark.skipif(kubernetes_validate is None, reason="kubernetes-validate not installed (tests/requirements.txt)")
@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("variant", KINDS_WITH_SCHEMAS)
def test_every_object_is_valid_against_the_kubernetes_schemas(variant, version):
    objects = render(variant)
    assert len(objects) >= 13
    for o in objects:
        try:
            # strict: an unknown or misspelt field is an error, not silently dropped.
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{key(o)} against {version}: {e.message} at {'.'.join(map(str, e.absolute_path))}")


# --- policies --------------------------------------------------------------------------------

def dockerfile_uid():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    user = re.search(r"^USER (\d+):(\d+)$", text, re.M)
    assert user, "the Dockerfile's USER is numeric"
    return int(user.group(1))


def test_every_pod_runs_confined_with_limits_and_probes(base):
    deployments = [o for o in base.values() if o["kind"] == "Deployment"]
    assert {o["metadata"]["name"] for o in deployments} == {"fleet-balancer", "fleet-worker", "fleet-redis"}
    for d in deployments:
        spec = pod_spec(d)
        pod_sc = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, key(d)
        for c in spec["containers"]:
            sc = {**pod_sc, **c.get("securityContext", {})}
            where = f"{key(d)} {c['name']}"
            assert sc.get("runAsNonRoot") is True, where
            assert isinstance(sc.get("runAsUser"), int) and sc["runAsUser"] > 0, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            res = c.get("resources", {})
            assert res.get("limits", {}).get("memory") and res.get("requests", {}).get("cpu"), where
            assert res["requests"].get("memory"), where
            assert c.get("readinessProbe") and c.get("livenessProbe"), where
            assert ":" in c["image"] and not c["image"].endswith(":latest"), where
    for name in ("fleet-balancer", "fleet-worker"):
        spec = pod_spec(base[("Deployment", name)])
        sc = {**spec["securityContext"], **spec["containers"][0].get("securityContext", {})}
        assert sc["runAsUser"] == dockerfile_uid(), "the image's user"
        # Spread over nodes and zones, without refusing to schedule on a small cluster.
        spread = spec["topologySpreadConstraints"]
        assert {t["topologyKey"] for t in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
        assert all(t["labelSelector"]["matchLabels"] == {"app": name} for t in spread)


def test_every_deployment_has_a_disruption_budget(base):
    pdbs = [o for o in base.values() if o["kind"] == "PodDisruptionBudget"]
    for d in (o for o in base.values() if o["kind"] == "Deployment"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        matching = [p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(matching) == 1, key(d)
        budget = matching[0]["spec"]
        if d["spec"]["replicas"] > 1:
            # Something must stay up: at least one pod, never all of them at once.
            assert budget.get("minAvailable", 0) >= 1 or budget.get("maxUnavailable", 99) < d["spec"]["replicas"], key(d)


def test_image_is_the_release_not_latest():
    version = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]
    for variant in ("", "ingress"):
        for o in render(variant):
            for c in containers(o):
                if c["image"].startswith("fleet"):
                    assert c["image"] == f"fleet:{version}", (variant, c["image"])


def test_secrets_come_from_secrets_through_the_environment(base):
    # Nothing secret in the ConfigMap (anyone allowed to read ConfigMaps reads it) ...
    cfg = fleet_file(base)
    assert "sticky_secret" not in cfg.get("balancer", {}) and "redis" not in cfg
    # ... nor on a command line (any process listing shows it).
    for o in base.values():
        for c in containers(o):
            line = " ".join(c.get("command", []) + c.get("args", []))
            assert "redis://" not in line and "requirepass" not in line.split("<<")[0], (key(o), line)
    env = {e["name"]: e for e in base[("Deployment", "fleet-balancer")]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert secret_value(base, env["FLEET_STICKY_SECRET"]["valueFrom"]["secretKeyRef"])
    worker = base[("Deployment", "fleet-worker")]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in worker["env"]}
    url = secret_value(base, env["FLEET_REDIS_URL"]["valueFrom"]["secretKeyRef"])
    redis = base[("Deployment", "fleet-redis")]["spec"]["template"]["spec"]["containers"][0]
    password = secret_value(base, {e["name"]: e for e in redis["env"]}["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"])
    # Redis has a password, and the workers' URL carries that one.
    assert password and f":{password}@" in url


def test_only_the_workers_reach_redis(base):
    policy = base[("NetworkPolicy", "fleet-redis")]["spec"]
    redis_labels = base[("Deployment", "fleet-redis")]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= redis_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app": "fleet-worker"}}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]


def balancer_grace_secs(cfg):
    b, w = cfg.get("balancer", {}), cfg.get("workers", {})
    return b.get("grace_period_secs", w.get("drain_window_secs", 10) + 5)  # FleetConfig::grace_period


def test_shutdowns_fit_their_grace_periods(base):
    bal = base[("Deployment", "fleet-balancer")]["spec"]["template"]["spec"]
    pre_stop = bal["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # preStop, then the balancer's grace period and its 2 s shutdown timeout.
    assert bal["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + balancer_grace_secs(fleet_file(base)) + 2

    w = base[("Deployment", "fleet-worker")]["spec"]["template"]["spec"]
    probe = w["containers"][0]["readinessProbe"]
    # One slow answer does not take a worker out of the Service.
    assert probe["failureThreshold"] >= 2 and probe["timeoutSeconds"] >= 2


# --- agreement with the binaries -------------------------------------------------------------

def port_of(addr):
    return int(str(addr).rsplit(":", 1)[1])


def test_manifests_agree_with_the_binaries(base):
    worker = base[("Deployment", "fleet-worker")]["spec"]["template"]
    w = worker["spec"]["containers"][0]
    args = dict(zip(w["args"][::2], w["args"][1::2]))
    help_text = subprocess.run([BIN_DIR / "worker", "--help"], capture_output=True, text=True).stdout
    for flag in args:
        assert flag in help_text, flag
    assert "FLEET_REDIS_URL" in help_text
    port = port_of(args["--listen"])
    named = {p["name"]: p["containerPort"] for p in w["ports"]}
    assert named[w["readinessProbe"]["httpGet"]["port"]] == port
    assert w["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert worker["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    # The grace period covers the drain window.
    assert worker["spec"]["terminationGracePeriodSeconds"] > int(args["--drain-window-secs"])
    headless = base[("Service", "fleet-workers")]["spec"]
    assert headless["clusterIP"] == "None" and headless["ports"][0]["port"] == port

    bal = base[("Deployment", "fleet-balancer")]
    assert bal["spec"]["replicas"] >= 2
    b = bal["spec"]["template"]["spec"]["containers"][0]
    cfg = fleet_file(base)
    assert cfg["workers"]["discover"] == f"fleet-workers:{port}"
    named = {p["name"]: p["containerPort"] for p in b["ports"]}
    assert named["public"] == port_of(cfg["listen"]) and named["admin"] == port_of(cfg["metrics_listen"])
    assert named[b["readinessProbe"]["httpGet"]["port"]] == port_of(cfg["metrics_listen"])
    assert base[("Service", "fleet")]["spec"]["ports"][0]["targetPort"] == "public"


def check_fleet_file(tmp_path, text):
    """The real parser's verdict: `worker --config F --index N` past the count fails on the index
    only once the file has parsed and validated."""
    f = tmp_path / "fleet.yaml"
    f.write_text(text)
    r = subprocess.run([BIN_DIR / "worker", "--config", str(f), "--index", "100000"],
                       capture_output=True, text=True, timeout=10)
    assert "is out of range" in r.stderr, r.stderr


def test_ingress_variant_trusts_its_proxies_and_routes_to_the_balancers(tmp_path, base):
    ingress = by_key(render("ingress"))
    assert set(base) < set(ingress)
    base_cfg, cfg = fleet_file(base), fleet_file(ingress)
    trusted = cfg["balancer"].pop("trusted_proxies")
    assert trusted and not cfg["balancer"]
    del cfg["balancer"]
    assert cfg == base_cfg, "the overlay's fleet file is the base's plus trusted_proxies"
    for variant in (base, ingress):
        check_fleet_file(tmp_path, variant[("ConfigMap", "fleet-balancer")]["data"]["fleet.yaml"])

    rule = ingress[("Ingress", "fleet")]["spec"]["rules"][0]["http"]["paths"][0]
    service = ingress[("Service", rule["backend"]["service"]["name"])]
    assert rule["path"] == "/socket.io/"
    assert rule["backend"]["service"]["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}


def test_pod_monitors_scrape_every_pod_under_the_alerts_job_names(base):
    monitors = render("prometheus-operator")
    alerts = (ROOT / "deploy/prometheus/alerts.yml").read_text()
    jobs = set()
    for m in monitors:
        assert m["apiVersion"] == "monitoring.coreos.com/v1" and m["kind"] == "PodMonitor"
        selector = m["spec"]["selector"]["matchLabels"]
        pods = [d for d in base.values() if d["kind"] == "Deployment"
                and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(pods) == 1, m["metadata"]["name"]
        ports = {p["name"] for p in pods[0]["spec"]["template"]["spec"]["containers"][0]["ports"]}
        for ep in m["spec"]["podMetricsEndpoints"]:
            assert ep["port"] in ports and ep["path"] == "/metrics"
            (relabel,) = ep["relabelings"]
            assert relabel["targetLabel"] == "job"
            jobs.add(relabel["replacement"])
    assert jobs == {"fleet-balancer", "fleet-workers"}
    for job in jobs:
        assert f'job="{job}"' in alerts


# --- run as the manifests say ----------------------------------------------------------------

def expand(value, env):
    """Kubernetes' $(VAR) expansion in command, args and env values."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def container_env(objects, container, pod_name, redis_port):
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
        elif "fieldRef" in e["valueFrom"]:
            assert e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            env[e["name"]] = pod_name
        else:
            value = secret_value(objects, e["valueFrom"]["secretKeyRef"])
            env[e["name"]] = value.replace("fleet-redis:6379", f"127.0.0.1:{redis_port}")
    return env


def test_redis_worker_and_balancer_run_as_their_manifests_say(closer, tmp_path, base):
    # Redis, with its password from the Secret, on a free local port.
    redis_port = free_port()
    r = base[("Deployment", "fleet-redis")]["spec"]["template"]["spec"]["containers"][0]
    script = r["args"][0].replace("redis-server -", f"redis-server - --port {redis_port} --bind 127.0.0.1", 1)
    closer.add(Proc("redis-k8s", r["command"] + [script], env=container_env(base, r, "fleet-redis-0", redis_port)))
    wait_until(lambda: port_open(redis_port), 10, what="redis from its manifest")

    # A worker, its Redis URL (with the password) from the environment only, the rest from the
    # ConfigMap's fleet file (mounted at /etc/fleet, as the balancer's).
    worker_port = free_port()
    port, admin = free_port(), free_port()
    text = (base[("ConfigMap", "fleet-balancer")]["data"]["fleet.yaml"]
            .replace("0.0.0.0:8080", f"127.0.0.1:{port}").replace("0.0.0.0:9100", f"127.0.0.1:{admin}")
            .replace("fleet-workers:9001", f"localhost:{worker_port}"))
    (tmp_path / "fleet.yaml").write_text(text)
    w = base[("Deployment", "fleet-worker")]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "config", "mountPath": "/etc/fleet", "readOnly": True} in w["volumeMounts"]
    env = container_env(base, w, "fleet-worker-7d9f-abcde", redis_port)
    args = [expand(a, env).replace("0.0.0.0:9001", f"127.0.0.1:{worker_port}")
            .replace("/etc/fleet/fleet.yaml", str(tmp_path / "fleet.yaml")) for a in w["args"]]
    worker = closer.add(Proc("worker-k8s", [str(BIN_DIR / w["command"][0])] + args, env=env))
    wait_until(lambda: requests.get(f"http://127.0.0.1:{worker_port}/readyz", timeout=2).status_code == 200, 15,
               what="worker from its manifest ready (it reached the password-protected Redis)")
    password = env["FLEET_REDIS_URL"].split(":")[2].split("@")[0]
    assert password not in Path(f"/proc/{worker.proc.pid}/cmdline").read_text()
    assert password not in worker.output()

    # A balancer with the ConfigMap's fleet file and the Secret's sticky secret.
    b = base[("Deployment", "fleet-balancer")]["spec"]["template"]["spec"]["containers"][0]
    args = [a.replace("/etc/fleet/fleet.yaml", str(tmp_path / "fleet.yaml")) for a in b["args"]]
    closer.add(Proc("bal-k8s", [str(BIN_DIR / b["command"][0])] + args, env=container_env(base, b, "fleet-balancer-0", 0)))
    wait_until(lambda: requests.get(f"http://127.0.0.1:{admin}/readyz", timeout=2).status_code == 200, 20,
               what="balancer from its manifest ready")
    # /readyz answers a few ms before the proxy service has bound its port.
    wait_until(lambda: port_open(port), 10, what="balancer listening")
    c = closer.add(Client(f"http://127.0.0.1:{port}", ["polling", "websocket"])).connect()
    assert c.call("whoami")["worker"] == "fleet-worker-7d9f-abcde"


def test_chat_variant_runs_the_app_as_the_workers(base):
    chat = by_key(render("chat"))
    worker = chat[("Deployment", "fleet-worker")]["spec"]["template"]["spec"]["containers"][0]
    assert worker["command"] == ["chat"] and worker["image"] == "fleet-chat:0.1.0"
    assert worker["args"] == base[("Deployment", "fleet-worker")]["spec"]["template"]["spec"]["containers"][0]["args"]
    env = {e["name"] for e in worker["env"]}
    assert {"CHAT_STATIC_DIR", "CHAT_ADMIN_KEY", "FLEET_REDIS_URL"} <= env
    cfg = yaml.safe_load(chat[("ConfigMap", "fleet-balancer")]["data"]["fleet.yaml"])
    assert cfg["balancer"]["forward_paths"] == ["/"]
