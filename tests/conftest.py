"""Hypothesis settings for the whole suite: no per-example deadline (a shared 2-core CI box is noisy),
and in CI a derandomized run, so a red build is always reproducible."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")
