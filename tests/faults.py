"""Real network faults for the fault tests: a TCP front on its own local port that relays to a
server (the local S3 endpoint, the MLflow server) and can be taken down and brought back.

Why a front and not the server itself: moto keeps its objects in memory, so a stopped moto comes
back empty. Clients see the front exactly as they would see the server: ``down()`` closes the
listening socket and every open connection (connection refused / reset), ``errors()`` answers
every HTTP request with ``503 Service Unavailable`` (S3's "SlowDown"), ``up()`` relays again.
"""

from __future__ import annotations

import socket
import threading

from vidray.stack import free_port

SLOW_DOWN_BODY = (b"<?xml version=\"1.0\"?><Error><Code>SlowDown</Code>"
                  b"<Message>Please reduce your request rate.</Message></Error>\n")


def slow_down(request: bytes) -> bytes:
    """S3's 503 answer; a HEAD request's answer has headers only."""
    body = b"" if request.startswith(b"HEAD ") else SLOW_DOWN_BODY
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(SLOW_DOWN_BODY) + body)


class TcpFront:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host, self.target_port, self.port = host, target_port, free_port()
        self.mode = "relay"
        self.connections = 0
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def up(self) -> "TcpFront":
        self.mode = "relay"
        self._listen()
        return self

    def errors(self) -> None:
        """Keep accepting connections, but answer every request with 503."""
        self._drop_connections()
        self.mode = "errors"
        self._listen()

    def down(self) -> None:
        """Nothing listens any more: new connections are refused, open ones reset."""
        self.mode = "down"
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            # close() alone does not wake a thread blocked in accept(), which would then relay
            # one more connection (and with keep-alive, everything after it).
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        self._drop_connections()

    def _listen(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.port))
            listener.listen(64)
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by down()
                return
            if listener is not self._listener:  # taken down meanwhile
                client.close()
                return
            self.connections += 1
            self._track(client)
            if self.mode == "errors":
                threading.Thread(target=self._answer_503, args=(client,), daemon=True).start()
                continue
            try:
                server = socket.create_connection((self.host, self.target_port))
            except OSError:
                self._close(client)
                continue
            self._track(server)
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _answer_503(self, client: socket.socket) -> None:
        try:
            client.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = client.recv(65536)
                if not chunk:
                    break
                data += chunk
            client.sendall(slow_down(data))
        except OSError:
            pass
        self._close(client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        self._close(source)
        self._close(sink)

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.add(sock)

    def _close(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def _drop_connections(self) -> None:
        with self._lock:
            open_now = list(self._open)
        for sock in open_now:
            self._close(sock)
