"""The scaled cluster of the ops tests: 2 control + 3 docker workers and Flower, once per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import services
from tests.ops.cluster import OpsCluster, point_app_at, start_ops_cluster


@pytest.fixture(scope="module")
def ops_cluster(tmp_path_factory: pytest.TempPathFactory, docker_engine: str,
                registry: services.RegistryServer) -> Iterator[OpsCluster]:
    cluster = start_ops_cluster(tmp_path_factory.mktemp("ops-cluster"), registry)
    point_app_at(cluster)
    yield cluster
    cluster.stop()
