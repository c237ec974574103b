"""A TCP proxy that loses a gRPC reply for real: it forwards a call, then cuts the connection.

It reads the HTTP/2 frames going each way (a 9-byte header: 3 bytes length, 1 type,
1 flags, 4 stream id). A client stream whose DATA carries ``marker`` (bytes of the
request, such as the flow's name) is marked; the start of the server's reply on a
marked stream is not forwarded: both sockets are closed instead. For a unary call that
is the first HEADERS frame (type 1) the server sends on it; on a link (a stream that
carries many calls), the first DATA frame that holds a reply, which is larger than the
few bytes of an acknowledgement. The server has run the call; the client never hears.
That happens ``drops`` times; after that the proxy forwards everything.
:meth:`ReplyDropper.cut_all` breaks the connections open at a moment the test picks.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterable

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS = 0, 1

#: Bytes of a DATA frame that holds no reply at most: a link's acknowledgement frame (a
#: 5-byte gRPC message prefix and a few bytes of mesh.v1.Frame).
_ACK_AT_MOST = 24


class ReplyDropper:
    """Listens on 127.0.0.1:``port`` and relays to ``target`` (host, port)."""

    def __init__(self, target: tuple[str, int], marker: bytes, drops: int = 1) -> None:
        self.target = target
        self.marker = marker
        self.drops = drops
        self.dropped = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._marked: set[tuple[int, int]] = set()  # (connection, stream id)
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def cut_all(self) -> None:
        """Break every connection open now, whatever is in flight on it."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        _break(sockets)

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._sockets += [client, server]
            pair = (client, server)
            threading.Thread(
                target=self._pump, args=(client, server, pair, True), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(server, client, pair, False), daemon=True
            ).start()

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        pair: tuple[socket.socket, socket.socket],
        upstream: bool,
    ) -> None:
        buf = b""
        preface = upstream  # the client's connection preface precedes its frames
        try:
            while True:
                chunk = src.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if preface:
                    if len(buf) < len(_PREFACE):
                        continue
                    dst.sendall(buf[: len(_PREFACE)])
                    buf = buf[len(_PREFACE) :]
                    preface = False
                while len(buf) >= 9:
                    length = int.from_bytes(buf[:3], "big")
                    if len(buf) < 9 + length:
                        break
                    kind = buf[3]
                    stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                    frame, buf = buf[: 9 + length], buf[9 + length :]
                    if upstream and kind == _DATA and self.marker in frame:
                        with self._lock:
                            self._marked.add((id(pair), stream))
                    reply = kind == _HEADERS or (kind == _DATA and length > _ACK_AT_MOST)
                    if not upstream and reply and self._cut((id(pair), stream)):
                        _break(pair)
                        return
                    dst.sendall(frame)
        except OSError:
            pass
        finally:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _cut(self, stream: tuple[int, int]) -> bool:
        with self._lock:
            if stream in self._marked and self.dropped < self.drops:
                self._marked.discard(stream)
                self.dropped += 1
                return True
            return False


def _break(sockets: Iterable[socket.socket]) -> None:
    """Close connections for real, now.

    ``shutdown`` first: a bare ``close`` while another thread is blocked in
    ``recv`` on the socket does not end the connection until that call returns.
    """
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()
