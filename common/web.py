"""The web stack tidal's HTTP services share (reward server, labeling app): Starlette apps run
by uvicorn on a socket bound before serving, so port 0 works and the URL is known up front."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading

import uvicorn
from starlette.requests import Request

# An error answer is sent after reading (and discarding) the body up to this size: closing a
# socket with unread input resets the connection, and the client would never see the 401/413.
DRAIN_BYTES = 64 * 1024 * 1024


class BodyTooLarge(Exception):
    pass


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or BodyTooLarge as soon as it passes `limit` bytes (a declared
    Content-Length over the limit is refused before anything is read)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(size)
        chunks.append(chunk)
    return b"".join(chunks)


async def drain(request: Request) -> None:
    """Reads what is left of the body (up to DRAIN_BYTES) so an early error answer arrives."""
    left = DRAIN_BYTES
    try:
        async for chunk in request.stream():
            left -= len(chunk)
            if left <= 0:
                break
    except Exception:  # already consumed or the client went away: nothing to drain
        pass


class WebServer:
    """Runs an ASGI app with uvicorn on (host, port); `start()` serves from a background thread
    (tests, embedding), `serve_forever()` in the calling thread until Ctrl-C."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, name: str = "web"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.name = name
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self):
        self._thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])),
                                        name=self.name, daemon=True)
        self._thread.start()
        while not self.server.started and self._thread.is_alive():
            threading.Event().wait(0.01)
        return self

    def serve_forever(self) -> None:
        """Blocks; uvicorn turns SIGINT/SIGTERM into a graceful stop (then re-raises SIGINT as
        KeyboardInterrupt in this thread, which the caller handles)."""
        self.server.run(sockets=[self.sock])

    def run(self) -> None:
        """`tidal ... serve`: serve until Ctrl-C / SIGTERM, then close."""
        try:
            self.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self.close()

    def close(self) -> None:
        if self._thread is not None:
            self.server.should_exit = True
            self._thread.join(timeout=10)
        self.sock.close()
