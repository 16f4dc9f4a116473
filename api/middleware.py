"""Two rules for every HTTP exchange, as plain ASGI middleware (they also hold for the live streams).

- `SecurityHeaders`: every response, page or not, carries a Content-Security-Policy that lets a page load
  only this origin's own files (no inline script, no other site, no framing), `X-Content-Type-Options:
  nosniff` and a `Referrer-Policy` that sends no URL to anyone.
- `BodyLimit`: a request body larger than `api_max_body_bytes` is refused with 413, whether it says so in
  Content-Length or only turns out larger while it is read. It never reads the body itself: it counts what
  the application reads, which happens only after the route has checked the API key (dependencies.SiteRoute).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import Problem

SECURITY_HEADERS = (
    (b"content-security-policy", b"default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *((name, value) for name, value in SECURITY_HEADERS if name not in names)]
            await send(message)

        await self.app(scope, receive, with_headers)


def body_too_large(limit: int) -> Problem:
    return Problem(413, "request body too large", f"at most {limit} bytes", "body_too_large")


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        received, answering = 0, False

        async def limited() -> Message:
            nonlocal received
            too_large = declared.isdigit() and int(declared) > self.max_bytes
            if not too_large:
                message = await receive()
                if message["type"] != "http.request":
                    return message
                received += len(message.get("body", b""))
                too_large = received > self.max_bytes
            if not too_large:
                return message
            if answering:  # a streaming answer's disconnect listener: the client is done for
                return {"type": "http.disconnect"}
            raise body_too_large(self.max_bytes)  # where the app reads the body: after its key check

        async def watched(message: Message) -> None:
            nonlocal answering
            answering = answering or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited, watched)
