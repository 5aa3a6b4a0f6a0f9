"""Shared pytest configuration: a modest hypothesis profile so the suite stays fast.

Select another profile with ``HYPOTHESIS_PROFILE=thorough pytest``.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "flowgym",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "flowgym"))

# one intra-op thread per test process: the models under test are tiny, and two threads on two
# shared cores oversubscribe (measured 10-100x slowdowns when other processes also run)
import torch  # noqa: E402

torch.set_num_threads(1)
