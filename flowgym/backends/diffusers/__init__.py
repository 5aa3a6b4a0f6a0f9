"""The shared base of the diffusers flow-matching families (not a family itself; registers nothing).

* ``DiffusersBackend`` (``backend.py``): loading, dtype / device, LoRA and the reference policy, the
  prompt cache, guidance, decoding; a family adapter subclasses it (``flowgym/backends/sd3``,
  ``flux``, ``flux2_klein``, ``qwen_image``).
* ``Component``: one pipeline component (sub-folder, library class).
* ``FlowMatchSchedule`` (``schedule.py``): the model's own sigma schedule from its scheduler config.
"""

from flowgym.backends.diffusers.backend import Component, DiffusersBackend
from flowgym.backends.diffusers.schedule import FlowMatchSchedule, calculate_shift

__all__ = ["Component", "DiffusersBackend", "FlowMatchSchedule", "calculate_shift"]
