"""Rules, segments and boards written through the API: the PUT body as a definition, and the store's
refusals, as problem answers: 422 naming the field; 422 `site_limit` when the site would exceed one of its
limits; 409 `in_use` for a delete while other definitions refer to the entry. A refusal's `detail` joins its
problems with "; ", and its `problems` member lists them, one line each."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from api.problems import Problem
from schemas.boards import DEFINITION_ID
from schemas.definitions import DefinitionInUse, DefinitionsError

VALID_ID = re.compile(DEFINITION_ID)
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


def valid_id(ident: str) -> bool:
    return VALID_ID.match(ident) is not None


def validated(model: type[M], data: dict[str, Any], path_id: str) -> M:
    """A definition from a PUT body (its id may be left out): 422 naming the field when invalid."""
    if not valid_id(path_id):
        raise Problem(404, "no such definition", path_id)
    data = {"id": path_id, **data}
    if data["id"] != path_id:
        raise Problem(422, "invalid definition", f"id: {data['id']!r} does not match the path ({path_id!r})")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise refused(422, "invalid definition", [_field_problem(error) for error in err.errors()]) from err


def _field_problem(error: Mapping[str, Any]) -> str:
    """`when.url: ...` for a field, the bare message for the definition as a whole."""
    message = "unknown field" if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, ")
    path = ".".join(map(str, error["loc"]))
    return f"{path}: {message}" if path else message


def refused(status: int, title: str, problems: list[str], code: str = "") -> Problem:
    return Problem(status, title, "; ".join(problems), code, problems=problems)


async def stored(write: Awaitable[T]) -> T:
    """A definitions write; refused whole (422, every problem named) when the site's set would not hold, a
    delete refused (409) while something refers to the entry."""
    try:
        return await write
    except DefinitionInUse as err:
        raise refused(409, "definition in use", err.problems, "in_use") from err
    except DefinitionsError as err:
        if err.limit:
            raise refused(422, "site limit reached", err.problems, "site_limit") from err
        raise refused(422, "invalid definition", err.problems) from err
