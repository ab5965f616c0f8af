"""The web stack tidal's HTTP services share (reward server, labeling app): Starlette apps run
by uvicorn on a socket bound before serving, so port 0 works and the URL is known up front;
bodies read up to a limit, JSON parsed so that no body can make a server answer anything but a
JSON 4xx, and JSON answers for unknown paths, wrong methods and uncaught errors."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import socket
import threading
from typing import Callable

import uvicorn
from starlette.requests import Request
from starlette.responses import Response

# An error answer is sent after reading (and discarding) the body up to this size: closing a
# socket with unread input resets the connection, and the client would never see the 401/413.
DRAIN_BYTES = 64 * 1024 * 1024


class BodyTooLarge(Exception):
    pass


class BadJSON(ValueError):
    """A request body that is not JSON the server can read; the message says why (a 400)."""


def parse_json(body: bytes):
    """The JSON value of a request body, or BadJSON: not UTF-8, not JSON, nested deeper than
    Python's recursion limit (json.loads raises RecursionError there, which a server would turn
    into a 500 with a traceback), or an integer longer than Python converts (ValueError)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadJSON("the body is not UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadJSON(f"the body is not valid JSON ({e})") from None
    except RecursionError:
        raise BadJSON("the body nests JSON arrays or objects too deeply for this server; send a flat object") from None
    except ValueError as e:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise BadJSON(f"the body is not JSON this server can read ({e})") from None


def error_handlers(respond: Callable[[int, str], Response], endpoints: str) -> dict:
    """Starlette exception handlers that answer with `respond(status, message)` (JSON): an
    unknown path (404) or a wrong method (405) names the `endpoints` there are, and any uncaught
    exception is a 500 that names its type only (Starlette still logs the traceback)."""
    async def http_error(request: Request, exc) -> Response:
        if request.method not in ("GET", "HEAD"):
            await drain(request)
        what = "no such endpoint" if exc.status_code == 404 else f"{request.method} is not allowed on"
        return respond(exc.status_code, f"{what} {request.url.path}; use {endpoints}")

    async def server_error(request: Request, exc: Exception) -> Response:
        return respond(500, f"internal error ({type(exc).__name__}); the server's log has the details")
    return {404: http_error, 405: http_error, Exception: server_error}


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


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); a port out of range, one in use or an address this
    machine does not have is a user error naming --port / --host and the fix."""
    from tidal.common.config_schema import ConfigError

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: a TCP port is a number from 0 to 65535 (0: any free port).")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"--port {port}: the port is in use on {host} (another server?); pick another --port, "
                              f"or --port 0 for any free one.") from None
        if e.errno == errno.EACCES:
            raise ConfigError(f"--port {port}: no permission to bind it (ports below 1024 need root); pick a port "
                              f"above 1023.") from None
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); use an address "
                          f"of this machine, e.g. --host 127.0.0.1.") from None
    return sock


class WebServer:
    """Runs an ASGI app with uvicorn on (host, port); `start()` serves from a background thread
    (tests, embedding), `serve_forever()` in the calling thread until Ctrl-C."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, name: str = "web"):
        self.sock = bind_socket(host, port)
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
