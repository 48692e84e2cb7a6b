"""The server's guard against other sites: it answers only requests addressed to it and
made by pages allowed to. A `Host` header that does not name this server (DNS rebinding: a
foreign name resolving to 127.0.0.1) and an `Origin` of another site get 403, unless
`--allow-origin` names that origin; allowed origins get CORS headers and preflights.
"""

from __future__ import annotations

import json

from .serve_request import error_body

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def host_name(host_header: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1'."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class HostOriginGuard:
    """ASGI middleware: 403 for a Host header not naming this server (DNS rebinding) and for an
    Origin of another site, unless allowed; CORS headers and preflights for allowed origins."""

    def __init__(self, app, *, host: str, allow_origins: list[str]):
        self.app = app
        # bound to every interface: any name may reach it, the user chose so with --host
        self.hosts = None if host in WILDCARD_HOSTS else {*LOOPBACK_HOSTS, host_name(host)}
        self.origins = {o.rstrip("/").lower() for o in allow_origins}

    async def _refuse(self, send, message: str):
        body = json.dumps(error_body(message, "permission_error", None, "forbidden")).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if self.hosts is not None and host_name(host) not in self.hosts:
            return await self._refuse(send, f"Host {host[:100]!r} is not this server (see --host)")
        origin = headers.get("origin")
        if origin is None or origin.lower() in (f"http://{host.lower()}", f"https://{host.lower()}"):
            return await self.app(scope, receive, send)  # no Origin (not a browser) or same origin
        if "*" not in self.origins and origin.rstrip("/").lower() not in self.origins:
            return await self._refuse(send, f"Origin {origin[:100]!r} is not allowed (see --allow-origin)")
        cors = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS":  # a preflight
            await send(
                {
                    "type": "http.response.start",
                    "status": 204,
                    "headers": cors
                    + [
                        (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                        (b"access-control-allow-headers", b"authorization, content-type"),
                        (b"access-control-max-age", b"600"),
                    ],
                }
            )
            return await send({"type": "http.response.body", "body": b""})

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + cors}
            await send(message)

        return await self.app(scope, receive, send_with_cors)
