"""The digits family: the embedded default task's class-conditional rectified-flow model of 8x8 digits.

* ``backend``: ``DigitsBackend`` (registered as ``"digits"``, gym id ``FlowDenoise-Digits-v0``), its
  networks, the fixed data split and the shipped weights' I/O;
* ``metrics``: its prior-capability metrics (``digit_accuracy``, ``digit_fd``);
* ``pretrain``: ``python -m flowgym.backends.digits.pretrain`` retrains the shipped weights.
"""

from flowgym.backends.digits.backend import *  # noqa: F401,F403
from flowgym.backends.digits.backend import __all__  # noqa: F401
