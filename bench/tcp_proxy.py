"""A loopback TCP front for a server, with the distance of a real object store when asked for:

    python bench/tcp_proxy.py LISTEN_PORT TARGET_PORT [--latency-ms 20] [--bandwidth-mbps 100]

- latency: each response's first byte waits `--latency-ms` (a new request is data from the client after the
  server has answered, so keep-alive connections pay it per request, as S3 does per GET);
- bandwidth: each connection's downstream is capped at `--bandwidth-mbps` megabytes per second.
Both 0 (the default): a plain forwarder. The chaos tests use it so: ending this process is an object-store
outage (connections refused) that keeps the data, and starting it again on the same port is the store
coming back. The data benchmark puts it in front of moto_server to put S3 at a real distance.
"""
from __future__ import annotations

import argparse
import asyncio
import time

CHUNK = 65536


class Link:
    """One client connection's two directions: a response waits out the latency once per request, and its
    bytes leave no faster than the bandwidth allows."""

    def __init__(self, latency_s: float, bytes_per_s: float):
        self.latency_s, self.bytes_per_s = latency_s, bytes_per_s
        self.new_request = False
        self.budget_from = time.monotonic()  # when the downstream is free to send again

    async def upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def chunk(data):
            self.new_request = True

        await _pipe(reader, writer, chunk)

    async def downstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def chunk(data):
            if self.new_request and self.latency_s:
                self.new_request = False
                await asyncio.sleep(self.latency_s)
            if self.bytes_per_s:
                self.budget_from = max(self.budget_from, time.monotonic()) + len(data) / self.bytes_per_s
                await asyncio.sleep(max(0.0, self.budget_from - time.monotonic()))

        await _pipe(reader, writer, chunk)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, before_write) -> None:
    try:
        while data := await reader.read(CHUNK):
            await before_write(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def serve(listen: int, target: int, latency_ms: float = 0.0, bandwidth_mbps: float = 0.0) -> None:
    async def handle(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            client_writer.close()
            return
        link = Link(latency_ms / 1000, bandwidth_mbps * 1e6)
        await asyncio.gather(link.upstream(client_reader, server_writer),
                             link.downstream(server_reader, client_writer))

    server = await asyncio.start_server(handle, "127.0.0.1", listen, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("listen", type=int)
    parser.add_argument("target", type=int)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--bandwidth-mbps", type=float, default=0.0, help="megabytes per second, per connection")
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.target, args.latency_ms, args.bandwidth_mbps))


if __name__ == "__main__":
    main()
