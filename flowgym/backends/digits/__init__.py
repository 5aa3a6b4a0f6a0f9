"""The digits family: the embedded default task's class-conditional rectified-flow model of 8x8 digits.

* ``core``: the data (scikit-learn's bundled digits, the fixed split), the prompts, the networks and
  the shipped weights' I/O;
* ``metrics``: its prior-capability metrics (``digit_accuracy``, ``digit_fd``);
* ``backend``: ``DigitsBackend`` (registered as ``"digits"``, gym id ``FlowDenoise-Digits-v0``);
* ``pretrain``: ``python -m flowgym.backends.digits.pretrain`` retrains the shipped weights.
"""

from flowgym.backends.digits.core import *  # noqa: F401,F403
from flowgym.backends.digits.core import __all__ as _core_names
from flowgym.backends.digits.backend import DigitsBackend, sample_ode

__all__ = [*_core_names, "DigitsBackend", "sample_ode"]
