"""Shared test configuration: Hypothesis profiles (deterministic in CI)."""

from hypothesis import HealthCheck, settings

# The engine chooses its Unicorn library (PYVMX_ENGINE: stock or the accelerated build) when it is
# first imported; import it before any test module imports unicorn itself.
import pyvmx.engine.unicorn_cpu  # noqa: F401

settings.register_profile(
    "default",
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("default")
