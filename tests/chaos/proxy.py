"""An asyncio TCP proxy that can silently drop traffic (a network partition).

::

    proxy = Proxy("127.0.0.1", server_port).start()   # runs in its own thread
    dsn = f"postgresql://postgres@127.0.0.1:{proxy.port}/db"
    proxy.partition()   # from now on every byte, both ways, is read and discarded;
                        # new connections are accepted and go nowhere
    proxy.partition_after(n)  # the same, once n more bytes went from clients to the
                        # server (what a read holds past them is dropped already)
    proxy.heal()        # connections that lost bytes are reset (their TCP
                        # streams are broken for good), new ones flow again
    proxy.pause()       # every byte, both ways, is held (not dropped) until resume()
    proxy.resume()      # what was held goes on, in order
    proxy.cut()         # every connection is reset now (RST); new ones flow
    proxy.silence(port) # only the connection whose server side has local port ``port``
                        # (its backend's pg_stat_activity.client_port) drops every byte
    proxy.stop()

Nothing is closed while partitioned: the client sees silence, not an error,
so it has to notice by itself.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    damaged: bool = False  # bytes were dropped: the stream cannot be resumed
    silent: bool = False  # this connection alone is partitioned (Proxy.silence)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for writer in (self.client, self.server):
            if writer is not None:
                writer.transport.abort()  # RST, not FIN
        for task in self.tasks:
            task.cancel()


class Proxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.partitioned = False
        self.links: set[_Link] = set()
        self.connections = 0  # accepted, in total
        self.dropped_bytes = 0
        self.resets = 0
        self._cut_after: int | None = None  # bytes upstream until partition_after() cuts
        self._flowing: asyncio.Event | None = None  # cleared while paused (made in the loop)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None

    # -- control (from any thread) ---------------------------------------

    def start(self) -> Proxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def partition(self) -> None:
        self._call(self._set(True))

    def partition_after(self, count: int) -> None:
        """Partition once ``count`` more bytes went from the clients to the server: a cut
        at a known point of a stream, whatever the pace of either side."""
        async def arm() -> None:
            self._cut_after = count
        self._call(arm())

    def heal(self) -> None:
        self._call(self._set(False))

    def pause(self) -> None:
        """Hold every byte, both ways, from now on (read, kept, not written) until
        :meth:`resume`: a path that stalls without losing anything."""
        async def hold() -> None:
            assert self._flowing is not None
            self._flowing.clear()
        self._call(hold())

    def resume(self) -> None:
        async def flow() -> None:
            assert self._flowing is not None
            self._flowing.set()
        self._call(flow())

    def cut(self) -> None:
        """Reset every connection now (RST both ways); new ones flow."""
        async def reset() -> None:
            for link in list(self.links):
                self.resets += 1
                link.abort()
                self.links.discard(link)
        self._call(reset())

    def silence(self, server_port: int) -> bool:
        """Partition one connection: the one whose socket to the server has local port
        ``server_port``; whether there was one."""
        return bool(self._call(self._silence(server_port)))

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for link in list(self.links):
                link.abort()
            # every connection's task ends here, not when garbage collected after the loop
            # stopped (an unraisable exception in whichever test runs then)
            for _ in range(10):  # a connection accepted meanwhile starts a task: again
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                if not tasks:
                    break
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await asyncio.sleep(0)
        self._call(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _call(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    # -- the proxy -------------------------------------------------------

    async def _listen(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _set(self, partitioned: bool) -> None:
        self.partitioned = partitioned
        if not partitioned:
            self._cut_after = None
            for link in [link for link in self.links if link.damaged]:
                self.resets += 1
                link.abort()
                self.links.discard(link)

    async def _silence(self, server_port: int) -> bool:
        for link in self.links:
            if link.server is not None and link.server.get_extra_info("sockname")[1] == server_port:
                link.silent = True
                return True
        return False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        link = _Link(writer)
        self.links.add(link)
        try:
            if self.partitioned:  # accepted, but the server never hears of it
                link.damaged = True
                await self._pump(reader, None, link)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                writer.transport.abort()
                return
            link.server = up_writer
            me = asyncio.current_task()
            assert me is not None
            other = asyncio.create_task(self._pump(up_reader, writer, link))
            link.tasks = [me, other]
            await self._pump(reader, up_writer, link, upstream=True)
            await other
        except asyncio.CancelledError:
            pass
        finally:
            self.links.discard(link)
            for w in (link.client, link.server):
                if w is not None:
                    try:
                        w.close()
                    except RuntimeError:  # the loop closed first (a task the shutdown missed)
                        pass

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None,
                    link: _Link, upstream: bool = False) -> None:
        while True:
            try:
                data = await reader.read(65536)
            except (ConnectionError, OSError):
                data = b""
            if not data:
                if writer is not None and not link.damaged:
                    try:
                        writer.write_eof()
                    except (OSError, RuntimeError):
                        pass
                return
            if self._flowing is not None and not self._flowing.is_set():
                await self._flowing.wait()  # paused: held here, the rest in the socket buffers
            left = self._cut_after
            if upstream and left is not None and not self.partitioned and writer is not None:
                if len(data) < left:
                    self._cut_after = left - len(data)
                else:  # the cut: what passes it is dropped, from now on both ways
                    self._cut_after = None
                    writer.write(data[:left])
                    data = data[left:]
                    self.partitioned = link.damaged = True
                    self.dropped_bytes += len(data)
                    continue
            if self.partitioned or link.silent or writer is None:
                link.damaged = True
                self.dropped_bytes += len(data)
                continue
            writer.write(data)
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                return
