"""The Kubernetes deployment (k8s/, Dockerfile), checked without a Kubernetes cluster or a Docker engine.

The overlays are rendered here in Python (the kustomize subset they use: resources, JSON6902 patches, images) and,
where kubectl is on PATH, compared with `kubectl kustomize`. Every RayService, and the RayCluster inside it,
validates against the KubeRay CRD schemas (defaults filled first, as the API server does; fields the API server
would prune are errors); every serveConfigV2 parses with Ray's own ServeDeploySchema and is exactly what
k8s/render.py makes from the CLI's Serve config; the app's actors (the expert pool, the coordinators, the ingress)
fit the worker groups, each kind on its own group where custom resources say so. Then the cpu-demo overlay's
serveConfigV2 is deployed with `serve deploy` on a real `ray start --head` cluster and answers HTTP and gRPC.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import jsonpatch
import jsonschema
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from k8s.render import BASE_OVERRIDES, K8S, PATCH, overlays, render_patch, serve_config
from router_service.client import GenerationClient
from router_service.serve_config import grpc_servicer_functions
from router_service.settings import AppSettings

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = Path(__file__).resolve().parent / "data" / "kuberay"  # KubeRay's CRD schemas, see its README.md
OVERLAYS = [p.name for p in overlays()]
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches", "images"}  # what kustomize_build implements
HEAD_PORTS = {"gcs": 6379, "dashboard": 8265, "client": 10001, "serve": 8000, "serve-grpc": 9000, "metrics": 8080}
API_KEY_ENV, API_KEY_SECRET = "MOE_CLUSTER_API_KEY", {"name": "moe-cluster-api-key", "key": "api-key"}
WEIGHTS_CLAIM, WEIGHTS_MOUNT = "moe-cluster-weights", "/models"
# The architecture of Mixtral-8x7B-v0.1 (its config.json): the gpu overlay's checkpoint is not here to read it from.
MIXTRAL_8X7B: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_layers": 32, "num_heads": 32,
    "num_kv_heads": 8, "head_dim": 128, "num_experts": 8, "experts_per_token": 2, "max_position_embeddings": 32768,
    "dtype": "bfloat16"}
SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL)", re.I)


# ------------------------------------------------------------------------------------------ kustomize, in Python

def _load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _matches(obj: dict[str, Any], target: dict[str, str]) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    wanted = {"group": group, "version": version, "kind": obj["kind"], "name": obj["metadata"]["name"]}
    return all(wanted[key] == value for key, value in target.items())


def _set_images(node: Any, images: list[dict[str, str]]) -> None:
    """kustomize's images transformer: containers' and initContainers' images, matched by name (no tag)."""
    if isinstance(node, dict):
        for key in ("containers", "initContainers"):
            for container in node.get(key, []) if isinstance(node.get(key), list) else []:
                name, tag = container["image"], ""
                if ":" in name.rsplit("/", 1)[-1]:  # a tag, not a registry's port
                    name, _, tag = name.rpartition(":")
                for image in images:
                    if image["name"] == name:
                        container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}".rstrip(":")
        for value in node.values():
            _set_images(value, images)
    elif isinstance(node, list):
        for value in node:
            _set_images(value, images)


def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = sorted(set(kustomization) - KUSTOMIZATION_KEYS)
    assert not unsupported, f"{directory}: kustomization uses {unsupported}, which this test does not render"
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects += kustomize_build(path) if path.is_dir() else _load_all(path)
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"path", "target"}, f"{directory}: only file patches with a target are rendered here"
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        assert isinstance(ops, list), f"{directory / patch['path']}: only JSON6902 patches are rendered here"
        hits = [i for i, obj in enumerate(objects) if _matches(obj, patch["target"])]
        assert hits, f"{directory}: patch {patch['path']} matches no object"
        for i in hits:
            objects[i] = jsonpatch.apply_patch(objects[i], ops)
    _set_images(objects, kustomization.get("images", []))
    return objects


def built(overlay: str) -> list[dict[str, Any]]:
    return kustomize_build(K8S / "overlays" / overlay)


def rayservice(overlay: str) -> dict[str, Any]:
    (service,) = [o for o in built(overlay) if o["kind"] == "RayService"]
    return service


def pod_templates(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = service["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"]} | {g["groupName"]: g for g in cluster.get("workerGroupSpecs", [])}
    return {name: group["template"] for name, group in groups.items()}


# --------------------------------------------------------------------------- CRD schemas, as the API server reads them

def schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((SCHEMAS / name).read_text())
    return loaded


def with_defaults(instance: Any, node: dict[str, Any]) -> Any:
    """Structural defaulting: a missing property with a default gets it, in every object that is present."""
    if isinstance(instance, dict):
        for key, sub in node.get("properties", {}).items():
            if key not in instance and "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
            if key in instance:
                with_defaults(instance[key], sub)
        if isinstance(node.get("additionalProperties"), dict):
            for key, value in instance.items():
                if key not in node.get("properties", {}):
                    with_defaults(value, node["additionalProperties"])
    elif isinstance(instance, list) and isinstance(node.get("items"), dict):
        for item in instance:
            with_defaults(item, node["items"])
    return instance


def pruned_fields(instance: Any, node: dict[str, Any], path: str = "") -> list[str]:
    """Fields the API server would silently drop (a typo in a manifest is lost, not rejected)."""
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out: list[str] = []
    if isinstance(instance, dict):
        props, extra = node.get("properties"), node.get("additionalProperties")
        for key, value in instance.items():
            if props is not None and key in props:
                out += pruned_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                out += pruned_fields(value, extra, f"{path}.{key}")
            elif props is not None and extra is not True:
                out.append(f"{path}.{key}")
    elif isinstance(instance, list) and isinstance(node.get("items"), dict):
        for i, item in enumerate(instance):
            out += pruned_fields(item, node["items"], f"{path}[{i}]")
    return out


def crd_errors(obj: dict[str, Any], schema_file: str) -> list[str]:
    crd = schema(schema_file)
    obj = with_defaults(copy.deepcopy(obj), crd)
    validator = jsonschema.Draft202012Validator(crd)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
    return errors + [f"pruned field {p}" for p in pruned_fields(obj, crd)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_and_raycluster_validate_against_the_kuberay_crds(overlay: str) -> None:
    services = [o for o in built(overlay) if o["kind"] == "RayService"]
    assert len(services) == 1
    for service in services:
        assert service["apiVersion"] == "ray.io/v1"
        assert crd_errors(service, "rayservice.ray.io_v1.schema.json") == []
        cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": service["metadata"]["name"]},
                   "spec": service["spec"]["rayClusterConfig"]}
        assert crd_errors(cluster, "raycluster.ray.io_v1.schema.json") == []


def test_the_crd_check_catches_what_the_api_server_would_reject_or_drop() -> None:
    service = rayservice("cpu-demo")
    bad = copy.deepcopy(service)
    del bad["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    bad["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True
    errors = crd_errors(bad, "rayservice.ray.io_v1.schema.json")
    assert any("'template' is a required property" in e for e in errors), errors
    assert "pruned field .spec.rayClusterConfig.enableInTreeAutoscalling" in errors
    defaulted = with_defaults({"workerGroupSpecs": [{"groupName": "g"}]},
                              schema("raycluster.ray.io_v1.schema.json")["properties"]["spec"])
    assert defaulted["workerGroupSpecs"][0]["maxReplicas"] == 2147483647


# ---------------------------------------------------------------------------------- serveConfigV2: one source of truth

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_patch_is_rendered_from_the_cli_serve_config(overlay: str) -> None:
    path = K8S / "overlays" / overlay / PATCH
    assert path.exists(), f"{path.relative_to(ROOT)} is missing: run python -m k8s.render"
    assert path.read_text() == render_patch(path.parent), \
        f"{path.relative_to(ROOT)} drifted from router_service/configs/serve.yaml and the overrides: " \
        f"run python -m k8s.render"
    assert yaml.safe_load(rayservice(overlay)["spec"]["serveConfigV2"]) == serve_config(path.parent)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_parses_with_ray_and_the_app(overlay: str) -> None:
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(rayservice(overlay)["spec"]["serveConfigV2"])
    parsed = ServeDeploySchema.model_validate(config)
    assert parsed.http_options.host == "0.0.0.0" and parsed.http_options.port == HEAD_PORTS["serve"]
    grpc_options = parsed.grpc_options
    assert grpc_options is not None and grpc_options.port == HEAD_PORTS["serve-grpc"]
    assert grpc_options.grpc_servicer_functions == grpc_servicer_functions() and grpc_options.enable_reflection
    (app,) = parsed.applications
    assert app.import_path == "router_service.app:build_app"
    settings = AppSettings.from_args(app.args)
    assert settings.api_key_env == API_KEY_ENV
    assert settings.ingress_autoscaling is not None
    autoscaling = AutoscalingConfig(**settings.ingress_autoscaling)
    assert 1 <= autoscaling.min_replicas < autoscaling.max_replicas
    assert Path(settings.model).is_absolute()


def _leaves(node: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Scalar and list values by path; applications are keyed by name (as in the override files)."""
    if isinstance(node, dict):
        out: dict[tuple[str, ...], Any] = {}
        for key, value in node.items():
            if key == "applications" and isinstance(value, list):
                value = {app["name"]: app for app in value}
            out |= _leaves(value, (*prefix, key))
        return out
    return {prefix: node}


def test_render_is_the_cli_config_with_the_overrides_on_top() -> None:
    cli = _leaves(yaml.safe_load((ROOT / "router_service" / "configs" / "serve.yaml").read_text()))
    base = _leaves(yaml.safe_load(BASE_OVERRIDES.read_text()))
    for overlay in overlays():
        rendered = _leaves(serve_config(overlay))
        layers = [_leaves(yaml.safe_load((overlay / "serve-overrides.yaml").read_text())), base, cli]  # winner first
        for i, layer in enumerate(layers):
            for path, value in layer.items():
                if not any(path[:len(p)] == p for above in layers[:i] for p in above):
                    assert rendered[path] == value, (overlay.name, path)
        assert set(rendered) <= set().union(*layers), overlay.name


# --------------------------------------------------------------------------------------------- the manifests' shape

def _containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    return list(template["spec"]["containers"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cluster_shape(overlay: str) -> None:
    import ray

    service = rayservice(overlay)
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    head_ports = {p["name"]: p["containerPort"] for p in _containers(head["template"])[0]["ports"]}
    assert head_ports == HEAD_PORTS
    assert all(g["rayStartParams"].get("metrics-export-port") == str(HEAD_PORTS["metrics"])
               for g in [head, *cluster["workerGroupSpecs"]])
    for group in cluster["workerGroupSpecs"]:
        assert {"minReplicas", "maxReplicas", "replicas"} <= set(group), group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
    gpu_groups = [g for g in cluster["workerGroupSpecs"] if "num-gpus" in g["rayStartParams"]]
    for group in gpu_groups:
        (container,) = _containers(group["template"])
        gpus = group["rayStartParams"]["num-gpus"]
        assert str(container["resources"]["requests"]["nvidia.com/gpu"]) == gpus, group["groupName"]
        assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == gpus, group["groupName"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
            group["template"]["spec"]["tolerations"]
    assert bool(gpu_groups) == (overlay != "cpu-demo")
    for name, template in pod_templates(service).items():
        spec = template["spec"]
        assert template["metadata"]["labels"]["app.kubernetes.io/part-of"] == "moe-cluster", name
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in _containers(template):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert container["resources"]["requests"] == container["resources"]["limits"], name
            params = (cluster["headGroupSpec"] if name == "head" else
                      next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == name))["rayStartParams"]
            assert params["num-cpus"] in ("0", str(container["resources"]["limits"]["cpu"])), name
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory", name
            if overlay != "cpu-demo":
                weights = mounts[WEIGHTS_MOUNT]
                assert weights["readOnly"] is True, name
                claim = volumes[weights["name"]]["persistentVolumeClaim"]
                assert claim == {"claimName": WEIGHTS_CLAIM, "readOnly": True}, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_values_and_the_api_key_comes_from_a_secret(overlay: str) -> None:
    objects = built(overlay)
    assert not [o for o in objects if o["kind"] == "Secret"]
    for name, template in pod_templates(rayservice(overlay)).items():
        for container in _containers(template):
            env = {e["name"]: e for e in container.get("env", [])}
            assert env[API_KEY_ENV] == {"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": API_KEY_SECRET}}, name
            literal = [e["name"] for e in env.values() if "value" in e and SECRET_NAME.search(e["name"])]
            assert not literal, f"{name}: secret-looking env vars with literal values: {literal}"
    text = yaml.safe_dump_all(objects)
    assert not re.search(r"(Bearer\s+\S{8,}|sk-[A-Za-z0-9]{16,}|hf_[A-Za-z0-9]{16,})", text)
    config = yaml.safe_load(rayservice(overlay)["spec"]["serveConfigV2"])
    assert "runtime_env" not in config["applications"][0]  # env vars (and keys) come from the pods, not Serve


# ----------------------------------------------------- the app's actors on the pods: pool, coordinators, ingress

Resources = dict[str, float]
Demand = tuple[str, Resources, str | None]  # what, the resources it holds, a STRICT_SPREAD key (else None)
EPSILON = 1e-9


def checkpoint_config(overlay: str) -> Any:
    """The ModelConfig of the overlay's checkpoint, which is not here (the demo's is baked into the image, Mixtral's
    is on the weights volume): the shape its config.json has."""
    from cluster.model.config import ModelConfig
    from cluster.model.demo import demo_config

    configs = {"cpu-demo": lambda: demo_config(1024), "gpu-mixtral-8x7b": lambda: ModelConfig(**MIXTRAL_8X7B)}
    assert overlay in configs, f"add the checkpoint shape of overlay {overlay} here"
    return configs[overlay]()


SettingsOf = Callable[[str], AppSettings]


@pytest.fixture
def app_settings(tmp_path: Path) -> SettingsOf:
    """The overlay's AppSettings, with its model path pointing at a config.json of the overlay's checkpoint shape
    (the pool's deployment options read the number of experts from it)."""
    def make(overlay: str) -> AppSettings:
        args = yaml.safe_load(rayservice(overlay)["spec"]["serveConfigV2"])["applications"][0]["args"]
        model = tmp_path / overlay
        model.mkdir()
        (model / "config.json").write_text(json.dumps(checkpoint_config(overlay).to_hf_dict()))
        return dataclasses.replace(AppSettings.from_args(args), model=str(model))
    return make


def config_deployment(overlay: str, name: str) -> dict[str, Any]:
    """The Serve config's own options for one deployment (its `deployments` entry), which win over the code's."""
    (app,) = yaml.safe_load(rayservice(overlay)["spec"]["serveConfigV2"])["applications"]
    entries = [{k: v for k, v in entry.items() if k != "name"} for entry in app.get("deployments", [])
               if entry["name"] == name]
    return entries[0] if entries else {}


def replica_range(options: dict[str, Any]) -> tuple[int, int]:
    """(fewest, most) replicas of a deployment with these options."""
    from ray.serve.config import AutoscalingConfig

    if options.get("autoscaling_config"):
        autoscaling = AutoscalingConfig(**options["autoscaling_config"])
        return autoscaling.min_replicas, autoscaling.max_replicas
    return options["num_replicas"], options["num_replicas"]


def actor_resources(ray_actor_options: dict[str, Any]) -> Resources:
    """What a Serve replica actor holds (Serve's default: 1 CPU)."""
    resources = {"CPU": float(ray_actor_options.get("num_cpus", 1)), "GPU": float(ray_actor_options.get("num_gpus", 0))}
    return resources | {k: float(v) for k, v in (ray_actor_options.get("resources") or {}).items()}


class AppShape:
    """The Ray resources of the app's replicas, from the functions that make its deployments' options."""

    def __init__(self, overlay: str, settings: AppSettings) -> None:
        from router_service.engine_deployment import DEPLOYMENT_NAME, engine_deployment_options
        from router_service.ingress import Ingress
        from router_service.pool_deployment import POOL_DEPLOYMENT, pool_deployment_options

        pool = pool_deployment_options(settings) | config_deployment(overlay, POOL_DEPLOYMENT)
        assert replica_range(pool) == (1, 1)
        self.pool_bundles = [{k: float(v) for k, v in bundle.items()} for bundle in pool["placement_group_bundles"]]
        self.pool_strategy: str = pool["placement_group_strategy"]
        assert fits(self.pool_bundles[0], actor_resources(pool["ray_actor_options"]))  # the manager: bundle 0
        engine = engine_deployment_options(settings) | config_deployment(overlay, DEPLOYMENT_NAME)
        self.coordinator = actor_resources(engine["ray_actor_options"])
        self.engines = replica_range(engine)
        ingress_options = ({"autoscaling_config": settings.ingress_autoscaling} if settings.ingress_autoscaling else
                           {"num_replicas": settings.ingress_replicas})
        ingress_deployment: Any = Ingress  # a Serve Deployment (the decorator's type is not visible to mypy)
        ingress = ({"ray_actor_options": ingress_deployment.ray_actor_options} | ingress_options |
                   config_deployment(overlay, ingress_deployment.name))
        self.ingress = actor_resources(ingress["ray_actor_options"])
        self.ingresses = replica_range(ingress)

    @property
    def workers(self) -> list[Resources]:
        return self.pool_bundles[1:]

    def demands(self, engines: int, ingresses: int) -> list[Demand]:
        pool: list[Demand]
        if self.pool_strategy == "STRICT_PACK":  # all of the pool on one node
            total: Resources = {}
            for bundle in self.pool_bundles:
                for key, value in bundle.items():
                    total[key] = total.get(key, 0.0) + value
            pool = [("the expert pool", total, None)]
        else:
            spread = "pool" if self.pool_strategy == "STRICT_SPREAD" else None
            pool = [("the pool manager", self.pool_bundles[0], spread)]
            pool += [(f"expert worker {i}", bundle, spread) for i, bundle in enumerate(self.workers)]
        return (pool + [(f"coordinator {i}", self.coordinator, None) for i in range(engines)] +
                [(f"ingress {i}", self.ingress, None) for i in range(ingresses)])


def group_resources(group: dict[str, Any], is_head: bool = False) -> Resources:
    """One pod's Ray resources as the Ray autoscaler reads them from the group (rayStartParams, then limits)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_ray_resources_from_group_spec

    resources = _get_ray_resources_from_group_spec(group, is_head=is_head)
    return {key: float(value) for key, value in resources.items() if key != "memory"}


def ray_nodes(service: dict[str, Any], count: str) -> list[tuple[str, Resources]]:
    """The Ray nodes (group name, resources) with every worker group at `count` ("minReplicas", "maxReplicas")."""
    cluster = service["spec"]["rayClusterConfig"]
    nodes = [("head", group_resources(cluster["headGroupSpec"], is_head=True))]
    for group in cluster["workerGroupSpecs"]:
        nodes += [(group["groupName"], group_resources(group)) for _ in range(group[count])]
    return nodes


def fits(node: Resources, demand: Resources) -> bool:
    return all(node.get(key, 0.0) + EPSILON >= value for key, value in demand.items() if value)


def _nonzero(free: list[tuple[str, Resources, set[str]]]) -> list[tuple[str, Resources]]:
    return [(group, {k: v for k, v in resources.items() if v > EPSILON}) for group, resources, _ in free]


def place(nodes: list[tuple[str, Resources]], demands: list[Demand]) -> dict[str, str]:
    """First fit, most constrained first (custom resources, then GPUs, then CPUs): the group each demand lands in.
    Fails naming the first demand that fits nowhere."""
    free = [(group, dict(resources), set[str]()) for group, resources in nodes]
    placed: dict[str, str] = {}
    order = sorted(demands, key=lambda d: (-len(set(d[1]) - {"CPU", "GPU"}), -d[1].get("GPU", 0), -d[1].get("CPU", 0)))
    for what, demand, spread in order:
        node = next((n for n in free if fits(n[1], demand) and (spread is None or spread not in n[2])), None)
        assert node is not None, f"{what} ({demand}) fits on no node; free: {_nonzero(free)}"
        for key, value in demand.items():
            node[1][key] = node[1].get(key, 0.0) - value
        if spread is not None:
            node[2].add(spread)
        placed[what] = node[0]
    return placed


def groups_that_fit(service: dict[str, Any], demand: Resources) -> set[str]:
    """The worker groups one of whose (empty) pods can hold ``demand``."""
    return {g["groupName"] for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
            if fits(group_resources(g), demand)}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pool_coordinators_and_ingress_fit_the_minimum_cluster(overlay: str, app_settings: SettingsOf) -> None:
    """The expert pool's placement group (manager + one bundle per worker), the fewest engine replicas (one
    coordinator each) and the fewest ingress replicas fit on the pods that exist at minReplicas, custom resources
    included, so the app comes up without waiting for the autoscaler."""
    settings = app_settings(overlay)
    # GPU use is explicit: never what the Ray cluster happens to have when the app starts.
    assert settings.pool_config().use_gpus is not None and settings.cluster_config().use_gpus is not None
    shape = AppShape(overlay, settings)
    workers = -(-checkpoint_config(overlay).num_experts // settings.pool_config().experts_per_worker)
    assert len(shape.workers) == workers
    assert all(bundle.get("GPU", 0) == int(bool(settings.pool_config().use_gpus)) for bundle in shape.workers)
    assert shape.engines[0] >= 1 and shape.ingresses[0] >= 1
    place(ray_nodes(rayservice(overlay), "minReplicas"), shape.demands(shape.engines[0], shape.ingresses[0]))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_most_engine_replicas_fit_the_maximum_cluster(overlay: str, app_settings: SettingsOf) -> None:
    """At maxReplicas the groups hold the pool, the most engine replicas and the most ingress replicas; and the
    groups where coordinators can go hold the most coordinators by themselves."""
    service, shape = rayservice(overlay), AppShape(overlay, app_settings(overlay))
    place(ray_nodes(service, "maxReplicas"), shape.demands(shape.engines[1], shape.ingresses[1]))
    homes = groups_that_fit(service, shape.coordinator)
    assert homes
    place([node for node in ray_nodes(service, "maxReplicas") if node[0] in homes],
          [(f"coordinator {i}", shape.coordinator, None) for i in range(shape.engines[1])])


def slots(group: dict[str, Any]) -> dict[str, float]:
    """A group's custom resources per pod, as `ray start --resources` gets them (KubeRay passes the value to a
    shell, which drops its quotes), and checked equal to what the Ray autoscaler reads."""
    value = group["rayStartParams"].get("resources")
    if value is None:
        return {}
    (word,) = shlex.split(value)
    parsed = json.loads(word)
    autoscaler = {k: v for k, v in group_resources(group).items() if k not in ("CPU", "GPU")}
    assert parsed == autoscaler, group["groupName"]
    return {k: float(v) for k, v in parsed.items()}


def test_gpu_overlay_puts_experts_and_coordinators_on_their_own_groups(app_settings: SettingsOf) -> None:
    """Mixtral-8x7B: 8 expert workers, one expert and one GPU each, only on the experts group, which is exactly
    their size and does not scale; each coordinator on a GPU of the coordinators group, which scales with the
    engine replicas. Custom resources (one slot per GPU) keep each kind on its group."""
    overlay = "gpu-mixtral-8x7b"
    service, settings = rayservice(overlay), app_settings(overlay)
    shape = AppShape(overlay, settings)
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "experts", "coordinators"}
    experts, coordinators = groups["experts"], groups["coordinators"]
    assert settings.pool_config().experts_per_worker == 1 and len(shape.workers) == 8
    assert all(worker.get("GPU") == 1 for worker in shape.workers) and shape.coordinator.get("GPU") == 1
    assert settings.pool_config().worker_resources == {"moe_expert_slot": 1}
    assert settings.cluster_config().coordinator_resources == {"moe_coordinator_slot": 1}
    for group, slot in ((experts, "moe_expert_slot"), (coordinators, "moe_coordinator_slot")):
        # one slot per GPU: a pod's GPUs and slots run out together
        assert slots(group) == {slot: float(group["rayStartParams"]["num-gpus"])}, group["groupName"]
    assert "resources" not in groups["cpu"]["rayStartParams"]
    # Each kind fits only its own group; what needs no GPU (the pool's manager, the ingress) takes no slot.
    assert all(groups_that_fit(service, worker) == {"experts"} for worker in shape.workers)
    assert groups_that_fit(service, shape.coordinator) == {"coordinators"}
    for demand in (shape.pool_bundles[0], shape.ingress):
        assert not demand.get("GPU") and set(demand) <= {"CPU", "GPU"}
    # The pool is fixed: the experts group is exactly its workers, always up.
    per_pod = slots(experts)["moe_expert_slot"]
    assert experts["minReplicas"] == experts["replicas"] == experts["maxReplicas"]
    assert experts["minReplicas"] * per_pod == len(shape.workers)
    # The engine replicas scale: the coordinators group from the fewest to the most of them.
    per_pod = slots(coordinators)["moe_coordinator_slot"]
    assert shape.engines[0] < shape.engines[1]
    assert coordinators["minReplicas"] * per_pod == shape.engines[0] <= coordinators["replicas"] * per_pod
    assert coordinators["maxReplicas"] * per_pod == shape.engines[1]
    placed = place(ray_nodes(service, "maxReplicas"), shape.demands(shape.engines[1], shape.ingresses[1]))
    assert {placed[f"expert worker {i}"] for i in range(8)} == {"experts"}
    assert {placed[f"coordinator {i}"] for i in range(shape.engines[1])} == {"coordinators"}


def test_grpc_service_reaches_the_serve_pods() -> None:
    for overlay in OVERLAYS:
        (svc,) = [o for o in built(overlay) if o["kind"] == "Service"]
        labels = rayservice(overlay)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
        selector = dict(svc["spec"]["selector"])
        assert selector.pop("ray.io/serve") == "true"  # KubeRay's label for pods with a healthy Serve proxy
        assert selector.items() <= labels.items()
        assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(9000, HEAD_PORTS["serve-grpc"])]


def test_weights_pvc_and_loader_match_the_gpu_overlay() -> None:
    (pvc,) = _load_all(K8S / "weights" / "pvc.yaml")
    (job,) = _load_all(K8S / "weights" / "load-mixtral-8x7b.yaml")
    assert pvc["metadata"]["name"] == WEIGHTS_CLAIM and "ReadWriteMany" in pvc["spec"]["accessModes"]
    job_spec = job["spec"]["template"]["spec"]
    assert job_spec["volumes"] == [{"name": "weights", "persistentVolumeClaim": {"claimName": WEIGHTS_CLAIM}}]
    assert job_spec["securityContext"]["runAsNonRoot"] is True
    model = serve_config(K8S / "overlays" / "gpu-mixtral-8x7b")["applications"][0]["args"]["model"]
    assert model.startswith(WEIGHTS_MOUNT + "/") and f'local_dir="{model}"' in job_spec["containers"][0]["args"][0]
    (token,) = job_spec["containers"][0]["env"]
    assert token["valueFrom"]["secretKeyRef"]["optional"] is True


def _kind_and_name(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def test_python_rendering_equals_kubectl_kustomize() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH")
    for overlay in OVERLAYS:
        out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert sorted(yaml.safe_load_all(out.stdout), key=_kind_and_name) == \
            sorted(built(overlay), key=_kind_and_name), overlay


# ------------------------------------------------------------------------------------------- image and docs

def test_dockerfile_matches_the_manifests() -> None:
    import ray

    dockerfile = (ROOT / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", dockerfile, re.M))
    assert args["RAY_VERSION"] == ray.__version__
    assert args["PYTHON"] == f"py{sys.version_info.major}{sys.version_info.minor}"
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON}${GPU:+-gpu}" in dockerfile.splitlines()
    demo = serve_config(K8S / "overlays" / "cpu-demo")["applications"][0]["args"]["model"]
    assert f"RUN moe-cluster init-demo {demo}" in dockerfile.splitlines()
    copied = {src.rstrip("/") for line in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, re.M)
              for src in line.split()}
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = re.search(r"include = \[(.*?)\]", pyproject)
    assert packages is not None
    assert {p.strip(' "*') for p in packages.group(1).split(",")} <= copied
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert copied <= allowed, f"COPY sources excluded by .dockerignore: {copied - allowed}"
    for path in copied:
        assert (ROOT / path).exists(), path


def test_images_are_the_project_image() -> None:
    for overlay in OVERLAYS:
        flavour = "gpu" if overlay.startswith("gpu") else "cpu"
        for name, template in pod_templates(rayservice(overlay)).items():
            assert {c["image"] for c in _containers(template)} == {f"moe-cluster:0.1.0-{flavour}"}, (overlay, name)


def test_docs_name_real_paths_and_the_secret() -> None:
    doc = (ROOT / "docs" / "kubernetes.md").read_text()
    for path in set(re.findall(r"\b(k8s/[\w./-]+[\w/])", doc)):
        assert (ROOT / path).exists(), f"docs/kubernetes.md names {path}, which does not exist"
    for needle in (*[f"k8s/overlays/{o}" for o in OVERLAYS], "moe-cluster-serve-svc", "moe-cluster-grpc",
                   API_KEY_SECRET["name"], "kubectl create secret", "not exercised"):
        assert needle in doc, needle


# ----------------------------------------------------------------- live: the cpu-demo serveConfigV2 on `ray start`

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def session_pids(sid: int) -> list[int]:
    """Live processes of one session: `ray start` runs in a session of its own, and its processes stay in it."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            state, _ppid, _pgrp, session = stat[stat.rindex(")") + 2:].split()[:4]
            if int(session) == sid and state != "Z":
                pids.append(int(entry))
    return pids


def stop_session(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> list[int]:
    """SIGTERM, then SIGKILL, to the processes of the session we started - by pid, nothing else on the machine."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while session_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
            proc.poll()
    proc.wait(timeout=10)
    return session_pids(proc.pid)


def tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not installed"
    return found


def serve_status(dashboard: str, env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([tool("serve"), "status", "-a", dashboard], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    status = yaml.safe_load(out.stdout) or {}
    app: dict[str, Any] = (status.get("applications") or {}).get("moe-cluster", {})
    return app


def adapt_to_this_machine(config: dict[str, Any], model: Path, http_port: int, grpc_port: int) -> dict[str, Any]:
    """Only what must differ from the pods: the model's path and the listening address."""
    local = copy.deepcopy(config)
    local["applications"][0]["args"]["model"] = str(model)
    local["http_options"].update(host="127.0.0.1", port=http_port)
    local["grpc_options"]["port"] = grpc_port
    return local


@pytest.fixture
def ray_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mk8s-"))  # short: Ray's unix sockets live under it
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process cleanup reads /proc")
def test_cpu_demo_serve_config_deploys_with_serve_deploy_and_answers_http_and_grpc(ray_dir: Path) -> None:
    from cluster.model.demo import init_demo

    config = yaml.safe_load(rayservice("cpu-demo")["spec"]["serveConfigV2"])
    http_port, grpc_port, gcs_port, dash_port, client_port, agent_port, metrics_port = (free_port() for _ in range(7))
    local = adapt_to_this_machine(config, init_demo(ray_dir / "demo"), http_port, grpc_port)
    config_file = ray_dir / "serve.yaml"
    config_file.write_text(yaml.safe_dump(local, sort_keys=False))
    api_key = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_DASHBOARD_ADDRESS")}
    # As in the pods: the key is in the nodes' environment (Serve replicas inherit it), never in the config.
    # Ray's own token auth, with a token of this test's, so ~/.ray/auth_token (if any) plays no part.
    env |= {API_KEY_ENV: api_key, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    dashboard = f"http://127.0.0.1:{dash_port}"
    log = (ray_dir / "ray-start.log").open("wb")
    start = time.monotonic()
    head = subprocess.Popen(
        [tool("ray"), "start", "--head", "--block", f"--port={gcs_port}", f"--dashboard-port={dash_port}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--num-cpus=16", "--disable-usage-stats",
         f"--temp-dir={ray_dir / 'ray'}", f"--ray-client-server-port={client_port}",
         f"--dashboard-agent-listen-port={agent_port}", f"--metrics-export-port={metrics_port}"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = start + 120
        while True:  # serve deploy goes through the dashboard: retry until it is up
            assert head.poll() is None, (ray_dir / "ray-start.log").read_text()[-3000:]
            out = subprocess.run([tool("serve"), "deploy", str(config_file), "-a", dashboard], capture_output=True,
                                 text=True, env=env, timeout=60)
            if out.returncode == 0:
                break
            assert time.monotonic() < deadline, f"serve deploy kept failing: {out.stderr[-3000:]}"
            time.sleep(1)
        while (app := serve_status(dashboard, env)).get("status") != "RUNNING":
            assert app.get("status") != "DEPLOY_FAILED", app
            assert time.monotonic() < deadline, f"not RUNNING after {deadline - start:.0f}s: {app}"
            time.sleep(1)

        http = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60, trust_env=False)
        model = local["applications"][0]["args"]["served_model_name"]
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
        assert http.get("/health").status_code == 200  # open, for probes
        assert http.post("/v1/completions", json=body).status_code == 401
        assert http.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        reply = http.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {api_key}"})
        assert reply.status_code == 200, reply.text
        completion = reply.json()
        assert completion["model"] == model and completion["usage"]["completion_tokens"] >= 1

        client = GenerationClient(f"127.0.0.1:{grpc_port}", model=model, timeout_s=60, api_key=api_key)
        try:
            answer = client.generate("Once upon a time", max_new_tokens=8, temperature=0)
            assert answer.text == completion["choices"][0]["text"]
            assert answer.usage.completion_tokens == completion["usage"]["completion_tokens"]
            with pytest.raises(grpc.RpcError) as err:
                GenerationClient(f"127.0.0.1:{grpc_port}", model=model, channel=client.channel).generate("x")
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            health = health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # open, for probes
        finally:
            client.close()
            http.close()
    finally:
        left = stop_session(head)
        log.close()
        assert not left, f"Ray processes outlived the test: {left}"
