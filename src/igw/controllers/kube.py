"""The Kubernetes API client: in-cluster service account or a kubeconfig file.

Resolution order (as ``kubectl`` and controller-runtime): an explicit kubeconfig path, else the
in-cluster service account when ``KUBERNETES_SERVICE_HOST`` is set, else ``$KUBECONFIG`` or
``~/.kube/config``. kubernetes-asyncio does the work (token refresh of a projected service
account token, exec/OIDC plugins of a kubeconfig); this module only chooses, and turns its
errors into a :class:`~igw.config.pool.ConfigError` that names the source.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from kubernetes_asyncio import client
from kubernetes_asyncio.config import incluster_config, kube_config
from kubernetes_asyncio.config.config_exception import ConfigException

from igw.config.pool import ConfigError

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@dataclass(frozen=True, slots=True)
class ClientSettings:
    kubeconfig: str | None = None
    """A kubeconfig file; None: in-cluster if running in a pod, else ``$KUBECONFIG``/``~/.kube/config``."""
    context: str | None = None
    """The kubeconfig context (None: its current context)."""
    qps_connections: int = 16
    """Connections the client may open to the API server at once (one per open watch)."""


def in_cluster(environ: Mapping[str, str] = os.environ) -> bool:
    return bool(environ.get("KUBERNETES_SERVICE_HOST"))


def pod_namespace(environ: Mapping[str, str] = os.environ, *, sa_dir: str = SERVICE_ACCOUNT_DIR) -> str | None:
    """The namespace the EPP runs in: ``$NAMESPACE``, else the service account's, else None."""
    if environ.get("NAMESPACE"):
        return environ["NAMESPACE"]
    try:
        with open(os.path.join(sa_dir, "namespace")) as f:
            return f.read().strip() or None
    except OSError:
        return None


async def load_configuration(
    settings: ClientSettings,
    *,
    environ: Mapping[str, str] = os.environ,
    sa_dir: str = SERVICE_ACCOUNT_DIR,
) -> client.Configuration:
    """A client configuration for the API server (raises ConfigError, naming the source)."""
    configuration = client.Configuration()
    configuration.connection_pool_maxsize = settings.qps_connections
    if settings.kubeconfig is None and in_cluster(environ):
        try:
            loader = incluster_config.InClusterConfigLoader(
                token_filename=os.path.join(sa_dir, "token"),
                cert_filename=os.path.join(sa_dir, "ca.crt"),
                environ=dict(environ),
            )
            loader.load_and_set(configuration)
        except ConfigException as exc:
            raise ConfigError(f"in-cluster Kubernetes configuration: {exc}") from None
        return configuration
    path = settings.kubeconfig or environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
    source = path or kube_config.KUBE_CONFIG_DEFAULT_LOCATION
    try:
        await kube_config.load_kube_config(
            config_file=path, context=settings.context, client_configuration=configuration, persist_config=False
        )
    except (ConfigException, OSError) as exc:
        raise ConfigError(f"kubeconfig {source}: {exc}") from None
    return configuration


async def connect(
    settings: ClientSettings, *, environ: Mapping[str, str] = os.environ, sa_dir: str = SERVICE_ACCOUNT_DIR
) -> client.ApiClient:
    """An ``ApiClient`` (close it with ``await api.close()``)."""
    configuration = await load_configuration(settings, environ=environ, sa_dir=sa_dir)
    return client.ApiClient(configuration=configuration)
