"""Real etcd clusters for the cluster tests.

``etcd_cluster``: one 3-member cluster for the whole session, shared by the tests that
leave it whole; each test works under its own ``key_prefix``. ``module_etcd_cluster``: one
for a module's tests. ``fresh_etcd_cluster``: a 3-member cluster of the test's own, for
tests that kill, pause or restart members.

Without an etcd binary the tests are skipped on a developer's machine and fail under CI
(``CI`` set), so a CI machine without etcd can't pass by running nothing.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from .etcd_cluster import EtcdCluster, EtcdNotInstalled


def _start(size: int = 3) -> EtcdCluster:
    try:
        return EtcdCluster(size)
    except EtcdNotInstalled as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI has no etcd: {exc}", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def etcd_cluster() -> Iterator[EtcdCluster]:
    with _start() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def module_etcd_cluster() -> Iterator[EtcdCluster]:
    """A 3-member cluster for one test module's tests (e.g. a set of nodes they share)."""
    with _start() as cluster:
        yield cluster


@pytest.fixture
def fresh_etcd_cluster() -> Iterator[EtcdCluster]:
    with _start() as cluster:
        yield cluster


@pytest.fixture
def key_prefix() -> str:
    """A key prefix no other test uses."""
    return f"/test/{uuid.uuid4().hex}/"
