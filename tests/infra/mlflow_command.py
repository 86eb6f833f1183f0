"""The MLflow server command line of infra/mlflow: read from the manifests, expanded, adjusted.

k8s/mlflow.yaml holds the command (``$(VAR)`` filled by Kubernetes from the container's env);
docker-compose.yaml repeats it with compose's ``${VAR}``; the server test runs it here.
"""

from __future__ import annotations

import re
from typing import Any

from tests.infra.k8s_manifests import INFRA, load_documents

K8S_FILE = INFRA / "mlflow" / "k8s" / "mlflow.yaml"
COMPOSE_FILE = INFRA / "mlflow" / "docker-compose.yaml"
_K8S_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_COMPOSE_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(?::?[-?])[^}]*)?\}")


def k8s_container() -> dict[str, Any]:
    (deployment,) = [d for d in load_documents(K8S_FILE) if d.get("kind") == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def k8s_command() -> list[str]:
    container = k8s_container()
    return [str(t) for t in [*container.get("command", []), *container.get("args", [])]]


def compose_as_k8s(tokens: list[str]) -> list[str]:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?message} written as Kubernetes' $(VAR)."""
    return [_COMPOSE_VAR.sub(r"$(\1)", str(t)) for t in tokens]


def k8s_variables(tokens: list[str]) -> set[str]:
    return {name for t in tokens for name in _K8S_VAR.findall(t)}


def expand(tokens: list[str], env: dict[str, str]) -> list[str]:
    """Fill $(VAR) as Kubernetes does.

    Raises:
        KeyError: a variable the command uses and ``env`` lacks (Kubernetes would leave it as text).
    """
    missing = sorted(k8s_variables(tokens) - set(env))
    if missing:
        raise KeyError(f"{K8S_FILE}: the command uses {missing}, not given")
    return [_K8S_VAR.sub(lambda m: env[m.group(1)], t) for t in tokens]


def with_option(tokens: list[str], flag: str, value: str) -> list[str]:
    """The same command with the value after ``flag`` replaced.

    Raises:
        ValueError: ``flag`` is not in the command.
    """
    if flag not in tokens:
        raise ValueError(f"{K8S_FILE}: the command has no {flag}")
    i = tokens.index(flag)
    return [*tokens[: i + 1], value, *tokens[i + 2 :]]
