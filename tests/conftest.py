"""Hypothesis settings for the whole suite: no per-example deadline (a shared 2-core CI box is noisy),
and in CI a derandomized run, so a red build is always reproducible. The cluster tests' selection."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def pytest_addoption(parser) -> None:
    parser.addoption("--cluster", action="store_true",
                     help="also run the tests marked `cluster` (tests/cluster), on the cluster stack (./dev test-cluster)")


def pytest_collection_modifyitems(config, items) -> None:
    """The cluster tests need a stack of their own and minutes each, so a plain run leaves them out: they are
    deselected (counted as such, never as passed or skipped), unless the run asks for them with --cluster or
    with a -m expression that names the marker (which then decides, as -m always does)."""
    if config.getoption("--cluster") or "cluster" in (config.getoption("markexpr") or ""):
        return
    cluster = [item for item in items if item.get_closest_marker("cluster")]
    if cluster:
        config.hook.pytest_deselected(items=cluster)
        items[:] = [item for item in items if not item.get_closest_marker("cluster")]
