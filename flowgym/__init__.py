"""flowgym: the denoising process of flow-matching image generators as an RL environment.

Importing the package registers the gymnasium id of every model family (``flowgym.backends``):
``FlowDenoise-Digits-v0`` (the embedded default task), ``FlowDenoise-SD3-v0`` (Stable Diffusion 3 /
3.5 through diffusers), ``FlowDenoise-Toy-v0`` (a tiny random model for tests), ...::

    import gymnasium as gym, flowgym
    env = gym.make("FlowDenoise-Digits-v0")
    venv = gym.make_vec("FlowDenoise-Digits-v0", num_envs=16, group_size=8)
"""

from flowgym.registration import env_ids, make_backend, make_env, register_envs

register_envs()

__version__ = "0.1.0"
__all__ = ["env_ids", "make_backend", "make_env", "register_envs", "__version__"]
