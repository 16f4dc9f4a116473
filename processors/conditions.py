"""The condition language (schemas.conditions) compiled to plain functions, shared by the rule engine and
segments: comparisons, groups and event filters are written once.

A compiled `Test` is a function of whatever its caller reads fields from (the rule engine's scope, a
segment's facts); the caller supplies how each leaf reads (`Leaf`), this module does the rest.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from operator import attrgetter
from typing import Any

from schemas.conditions import ConditionBase, EventFilters
from schemas.events import EnrichedEvent

Getter = Callable[[Any], Any]
Test = Callable[[Any], bool]
Leaf = Callable[[ConditionBase], Test]  # compiles a condition that is not an any/all group


def number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def key(value: Any) -> str:
    """Comparison key: case-insensitive text; 250, 250.0 and "250" are equal; true and "true" too."""
    if isinstance(value, bool):
        return "true" if value else "false"
    as_number = number(value)
    if as_number is not None and as_number == as_number:  # not NaN
        return repr(int(as_number)) if as_number.is_integer() else repr(as_number)
    return str(value).strip().casefold()


def has_value(value: Any) -> bool:
    return value is not None and value != "" and value != []


def compare(op: str, value: Any) -> Callable[[Any], bool]:
    """`op value` as a test of one read value (gt/lt/between take numbers; is/contains compare keys)."""
    if op == "exists":
        return has_value
    if op == "unknown":
        return lambda actual: not has_value(actual)
    if op in ("gt", "lt", "between"):
        low, high = (value if op == "between" else
                     (value, float("inf")) if op == "gt" else (float("-inf"), value))
        inclusive = op == "between"

        def in_range(actual: Any) -> bool:
            found = number(actual)
            if found is None:
                return False
            return low <= found <= high if inclusive else low < found < high
        return in_range
    if op == "contains":
        needle = key(value)

        def contains(actual: Any) -> bool:
            if isinstance(actual, list):
                return any(key(item) == needle for item in actual)
            return has_value(actual) and needle in key(actual)
        return contains
    wanted = frozenset(map(key, value if isinstance(value, list) else [value]))

    def equals(actual: Any) -> bool:
        if isinstance(actual, list):
            return any(key(item) in wanted for item in actual)
        return has_value(actual) and key(actual) in wanted
    if op == "is_not":
        return lambda actual: not equals(actual)
    return equals


def field_test(read: Getter, op: str, value: Any) -> Test:
    check = compare(op, value)
    return lambda scope: check(read(scope))


def compile_condition(condition: ConditionBase, leaf: Leaf) -> Test:
    """any/all groups here, every other shape by `leaf`."""
    if condition.shape == "any":
        tests = tuple(compile_condition(child, leaf) for child in condition.any)  # type: ignore[attr-defined]
        return lambda scope: any(test(scope) for test in tests)
    if condition.shape == "all":
        return all_of(condition.all, leaf)  # type: ignore[attr-defined]
    return leaf(condition)


def all_of(conditions: Iterable[ConditionBase], leaf: Leaf) -> Test:
    tests = tuple(compile_condition(condition, leaf) for condition in conditions)
    if not tests:
        return lambda scope: True
    if len(tests) == 1:
        return tests[0]
    return lambda scope: all(test(scope) for test in tests)


_WILDCARDS = re.compile(r"[*?]+")


def url_matcher(glob: str | None) -> Callable[[str], bool]:
    """A URL glob, case-insensitive; no glob matches every URL.

    A URL without the glob's longest literal part cannot match, and a substring test says so ~7x cheaper
    than the glob's regex: a site's long tail of page rules (`*/kb/topic-12/*`) is tried on every URL the
    rules' cache has not seen. The test is made only where it agrees exactly with the regex's ignore-case,
    an ASCII literal in an ASCII URL; a glob with a `[...]` set always runs the regex."""
    if not glob:
        return lambda url: True
    match = re.compile(fnmatch.translate(glob), re.IGNORECASE).match
    literal = "" if "[" in glob else max(_WILDCARDS.split(glob), key=len).lower()
    if not literal or not literal.isascii():
        return lambda url: match(url) is not None
    return lambda url: (literal in url.lower() or not url.isascii()) and match(url) is not None


def exact_matcher(filters: EventFilters) -> Callable[[EnrichedEvent], bool] | None:
    """The exact-value filters (channel, utm_*, name, campaign; case-insensitive), or None without any."""
    exact = tuple((attrgetter(name), expected.casefold()) for name, expected in filters.exact_filters())
    if not exact:
        return None
    return lambda event: all(read(event).casefold() == expected for read, expected in exact)
