"""Every answer that is not a success: JSON problem bodies (RFC 9457, `application/problem+json`).

A refusal is a `Problem` raised anywhere (a dependency, a handler, the body reader): a 4xx with a title, a
detail and a machine-readable `code` (also the problem `type`, as a URN). An outage of a store is a 503 whose
body names only what is unavailable and a request id; the cause, with its traceback, goes to the server log
under that id (an exception's class and text would tell a caller about the internals). A bug is a 500 in
the same way. Bad input is never a 500.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class Problem(HTTPException):
    """A 4xx/503 answer. `extra` adds members to the body (e.g. the command id of a refused command).
    An HTTPException, so that one raised while FastAPI reads the body (413) reaches its handler as it is."""

    def __init__(self, status: int, title: str, detail: str = "", code: str = "",
                 headers: Mapping[str, str] | None = None, **extra) -> None:
        super().__init__(status, title, dict(headers) if headers else None)
        self.status, self.title, self.problem_detail, self.code, self.extra = status, title, detail, code, extra


def _log_cause(what: str, cause: BaseException | str) -> str:
    """Logs why a request failed under a new request id, which the answer carries instead of the cause."""
    request_id = uuid.uuid4().hex[:16]
    log.error("%s [request %s]: %s", what, request_id, cause if isinstance(cause, str) else repr(cause),
              exc_info=cause if isinstance(cause, BaseException) else None)
    return request_id


def unavailable(what: str, cause: BaseException | str) -> Problem:
    """A 503 naming only `what` is unavailable; the cause goes to the server log."""
    request_id = _log_cause(f"503 {what}", cause)
    return Problem(503, what, f"try again later; the server log has the cause under request id {request_id}",
                   "unavailable", request_id=request_id)


def problem_response(status: int, title: str, detail: str = "", code: str = "",
                     headers: Mapping[str, str] | None = None, **extra) -> JSONResponse:
    body = {"type": f"urn:leadstream:problem:{code}" if code else "about:blank", "title": title,
            "status": status, "detail": detail}
    if code:
        body["code"] = code
    return JSONResponse(body | extra, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def install_handlers(app: FastAPI) -> None:
    """Every exception an API request can end in becomes a problem answer."""

    @app.exception_handler(Problem)
    async def on_problem(_: Request, exc: Problem):
        return problem_response(exc.status, exc.title, exc.problem_detail, exc.code, exc.headers, **exc.extra)

    @app.exception_handler(RedisError)
    async def on_redis_down(request: Request, exc: RedisError):
        return await on_problem(request, unavailable("board store unavailable", exc))

    @app.exception_handler(Exception)
    async def on_bug(_: Request, exc: Exception):
        """A bug: a 500 with a request id; the traceback goes to the server log, never to the caller."""
        request_id = _log_cause("500 internal error", exc)
        return problem_response(500, "internal error",
                                f"the server log has the cause under request id {request_id}", request_id=request_id)

    @app.exception_handler(HTTPException)
    async def on_http(_: Request, exc: HTTPException):
        return problem_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, exc: RequestValidationError):
        """400 for a malformed request (path, query, headers, unparsable JSON); 422 for a well-formed JSON
        body whose content is wrong, naming the field."""
        errors = exc.errors()
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        in_body = all(e["loc"][:1] == ("body",) and e["type"] != "json_invalid" for e in errors)
        return problem_response(422 if errors and in_body else 400, "invalid request", detail)


def _documented(*answers: tuple[int, str]) -> dict[int, dict]:
    return {status: {"content": {PROBLEM_JSON: {}}, "description": text} for status, text in answers}


# The problem answers of the OpenAPI description, per kind of operation.
ERRORS = _documented((400, "malformed request"), (401, "API key required"),
                     (403, "key not for this site, or read-only"),
                     (404, "no such board, card, rule or segment on this site"), (503, "a store is unavailable"))
WRITE_ERRORS = ERRORS | _documented((413, "request body too large"),
                                    (422, "invalid body, or a site limit reached"))
COMMAND_ERRORS = WRITE_ERRORS | _documented((409, "refused by the stage machine (`code`: stage_regression, ...)"),
                                            (412, "If-Match is not the current board version"),
                                            (422, "invalid body, unknown stage, free-mail domain"))
DELETE_ERRORS = ERRORS | _documented((409, "other definitions still refer to it (`code`: in_use; `problems`: "
                                          "one line per reference)"))
STREAM_ERRORS = ERRORS | _documented((429, "too many open streams for this key"))
