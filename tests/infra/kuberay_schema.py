"""Offline schema validation of our Kubernetes manifests, core kinds and KubeRay's alike.

kubeconform is not packaged for Debian or PyPI; kubernetes-validate (PyPI) ships the strict JSON
schemas of every Kubernetes release (additionalProperties false, required fields), which is what
kubeconform checks against. Core kinds (Deployment, StatefulSet, Service, Job, ConfigMap, ...)
are validated with them for Kubernetes ``KUBE_VERSION``.

RayCluster and RayJob are custom resources (ray.io/v1), absent from those schemas. ``RAY_SCHEMAS``
below are JSON schemas of the KubeRay v1 fields (KubeRay's API reference, release 1.5; the Go
types in ray-operator/apis/ray/v1), closed (``additionalProperties: false``) at every level,
with the embedded Kubernetes types (pod templates, services, resources, env) referenced to the
real strict definitions. So a misspelt KubeRay field and a misspelt container field both fail,
as ``kubectl apply`` would make them fail against the installed CRDs.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import jsonschema
import kubernetes_validate
from kubernetes_validate.utils import schema_contents
from referencing import Registry, Resource

KUBE_VERSION = "1.32"
_DEFS_URI = "https://kubernetes.io/api/_definitions.json"  # the $id of kubernetes-validate's definitions


def _k8s(name: str) -> dict[str, Any]:
    return {"$ref": f"{_DEFS_URI}#/$defs/io.k8s.{name}"}


def _closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "properties": properties, "required": list(required)}


_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_COUNT = {"type": "integer", "minimum": 0}
_POD_TEMPLATE = _k8s("api.core.v1.PodTemplateSpec")
_META = _k8s("apimachinery.pkg.apis.meta.v1.ObjectMeta")

_AUTOSCALER_OPTIONS = _closed({
    "resources": _k8s("api.core.v1.ResourceRequirements"),
    "image": {"type": "string"},
    "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
    "securityContext": _k8s("api.core.v1.SecurityContext"),
    "idleTimeoutSeconds": _COUNT,
    "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
    "version": {"enum": ["v1", "v2"]},
    "env": {"type": "array", "items": _k8s("api.core.v1.EnvVar")},
    "envFrom": {"type": "array", "items": _k8s("api.core.v1.EnvFromSource")},
    "volumeMounts": {"type": "array", "items": _k8s("api.core.v1.VolumeMount")},
})

_HEAD_GROUP = _closed({
    "template": _POD_TEMPLATE,
    "headService": _k8s("api.core.v1.Service"),
    "enableIngress": {"type": "boolean"},
    "rayStartParams": _STR_MAP,
    "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
    "labels": _STR_MAP,
    "resources": _STR_MAP,
}, required=("rayStartParams", "template"))

# minReplicas/maxReplicas are defaulted by the CRD; we require them: autoscaling bounds are explicit.
_WORKER_GROUP = _closed({
    "suspend": {"type": "boolean"},
    "groupName": {"type": "string", "minLength": 1},
    "replicas": _COUNT,
    "minReplicas": _COUNT,
    "maxReplicas": _COUNT,
    "idleTimeoutSeconds": _COUNT,
    "rayStartParams": _STR_MAP,
    "template": _POD_TEMPLATE,
    "scaleStrategy": _closed({"workersToDelete": {"type": "array", "items": {"type": "string"}}}),
    "numOfHosts": {"type": "integer", "minimum": 1},
    "labels": _STR_MAP,
    "resources": _STR_MAP,
}, required=("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"))

_CLUSTER_SPEC = _closed({
    "suspend": {"type": "boolean"},
    "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
    "authOptions": _closed({
        "mode": {"enum": ["disabled", "token"]},
        "secretName": {"type": "string"},
        "enableK8sTokenAuth": {"type": "boolean"},
    }),
    "autoscalerOptions": _AUTOSCALER_OPTIONS,
    "headServiceAnnotations": _STR_MAP,
    "enableInTreeAutoscaling": {"type": "boolean"},
    "gcsFaultToleranceOptions": {"type": "object"},
    "headGroupSpec": _HEAD_GROUP,
    "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
    "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
    "upgradeStrategy": {"type": "object"},
}, required=("headGroupSpec",))

_RAY_JOB_SPEC = _closed({
    "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
    "backoffLimit": _COUNT,
    "rayClusterSpec": _CLUSTER_SPEC,
    "submitterPodTemplate": _POD_TEMPLATE,
    "metadata": _STR_MAP,
    "clusterSelector": _STR_MAP,
    "submitterConfig": _closed({"backoffLimit": _COUNT}),
    "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
    "deletionStrategy": {"type": "object"},
    "entrypoint": {"type": "string", "minLength": 1},
    "runtimeEnvYAML": {"type": "string"},
    "jobId": {"type": "string"},
    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
    "entrypointResources": {"type": "string"},
    "entrypointNumCpus": {"type": "number", "minimum": 0},
    "entrypointNumGpus": {"type": "number", "minimum": 0},
    "ttlSecondsAfterFinished": _COUNT,
    "shutdownAfterJobFinishes": {"type": "boolean"},
    "suspend": {"type": "boolean"},
}, required=("entrypoint",))


def _resource(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _closed({"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind}, "metadata": _META, "spec": spec},
                   required=("apiVersion", "kind", "metadata", "spec"))


RAY_SCHEMAS: dict[str, dict[str, Any]] = {
    "RayCluster": _resource("RayCluster", _CLUSTER_SPEC),
    "RayJob": _resource("RayJob", _RAY_JOB_SPEC),
}


@cache
def _registry() -> Registry:
    definitions = schema_contents(f"kubernetes-json-schema/v{KUBE_VERSION}.0-local-strict/_definitions.json",
                                  KUBE_VERSION)
    return Registry().with_resource(_DEFS_URI, Resource.from_contents(definitions))


def _path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top)"


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """Every schema violation of one manifest as "path: message"; empty when it is valid.

    Kinds with no schema here or in kubernetes-validate are an error too: a manifest we cannot
    check is not silently accepted.
    """
    kind = doc.get("kind")
    if kind in RAY_SCHEMAS:
        validator = jsonschema.Draft202012Validator(RAY_SCHEMAS[kind], registry=_registry())
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
        return [f"{_path(e)}: {e.message}" for e in errors]
    try:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{_path(e)}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"(top): {e.message}"]
    return []
