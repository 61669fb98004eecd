"""A TCP port forwarder: ``python -m tests.faults._forward HOST PORT [PORT ...]``.

The NATS servers of a fault run listen on loopback only (``cloister.local``); node
processes in network namespaces reach them through this forwarder, which listens on
``HOST`` (the bridge address of the servers' "host") and relays every connection to
``127.0.0.1`` at the same port. Cutting a node's link then cuts it off from every server
exactly as a network partition does: its TCP connections go silent, nothing is reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

CHUNK = 65536


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy ``reader`` to ``writer`` until either side closes."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


def relay(port: int) -> object:
    """A connection handler relaying to ``127.0.0.1:port``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return handle


async def serve(host: str, ports: list[int]) -> None:
    servers = [await asyncio.start_server(relay(p), host, p) for p in ports]  # type: ignore[arg-type]
    print(f"forwarding {host} {ports}", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main() -> int:
    host, *ports = sys.argv[1:]
    asyncio.run(serve(host, [int(p) for p in ports]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
