"""Gymnasium views of ``FlowDenoiseEnv``: a single ``gym.Env`` and a native batched ``VectorEnv``.

* ``FlowDenoiseGymEnv``: one latent per episode, numpy observations in a ``Dict`` space, for
  gymnasium / Stable-Baselines3 tooling. The agent's action is the next latent.
* ``FlowDenoiseVectorEnv``: ``num_envs`` latents stepping together on torch tensors (on the env's
  device), autoreset mode ``SAME_STEP``: the step that ends an episode returns the first
  observation of the next one and puts the terminal observation in ``infos["final_obs"]``.

Observation (``observation_space_for``): a ``Dict`` of exactly six entries, per environment

* ``latent``: float32, the latent's shape, the current state;
* ``step``: int64 ``(1,)``, the step index 0 .. K (K after the last step);
* ``sigma``, ``sigma_next``: float32 ``(1,)``, the noise levels this step goes from and to;
* ``stochastic``: int64 ``(1,)``, 1 where the env asks for noise (a step an algorithm trains on);
* ``prompt_index``: int64 ``(1,)``, the prompt's index in ``env.unwrapped.core.prompt_list``.

Unlike the TorchRL ``FlowDenoiseEnv`` it does not hold the prompt text, the conditioning, the group
id or the reward terms. The single env puts the prompt text in ``info["prompt"]`` (at reset and at
every step); both put the terminal reward terms in ``info["reward_terms"]``. In the vector env, env
``i`` belongs to group ``i // group_size`` (consecutive envs share a prompt).

Both expose ``make_policy()``, a ``FlowPolicy`` configured with the env's kernel, noise level and
guidance defaults, so ``gym.make(...)`` users get a matching sampler. The policy reads a TensorDict
with ``latent``, ``sigma``, ``sigma_next``, ``stochastic`` and ``prompt`` (text) or ``conditioning``,
not this observation dict: build one from the observation and ``prompt_list[prompt_index]``, or use
the TorchRL env (``env.unwrapped.core``) directly.
"""

from __future__ import annotations

from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from flowgym.backends.base import FlowBackend
from flowgym.env import FlowDenoiseEnv

__all__ = ["FlowDenoiseGymEnv", "FlowDenoiseVectorEnv", "observation_space_for"]

#: default bound of the latent Box spaces: real latents (unit-variance noise, SD3 latents after
#: the VAE's scaling) stay within a few units; the bound only has to be finite and wide
DEFAULT_LATENT_BOUND = 100.0


def observation_space_for(core: FlowDenoiseEnv, latent_bound: float) -> spaces.Dict:
    """The single-environment observation space of ``core``: ``latent``, ``step``, ``sigma``,
    ``sigma_next``, ``stochastic`` and ``prompt_index`` (see the module docstring), nothing else."""
    return spaces.Dict(
        {
            "latent": spaces.Box(-latent_bound, latent_bound, shape=core.backend.latent_shape, dtype=np.float32),
            # integer Boxes rather than Discrete: TorchRL would one-hot encode Discrete spaces
            "step": spaces.Box(0, core.num_steps, shape=(1,), dtype=np.int64),
            "sigma": spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32),
            "sigma_next": spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32),
            "stochastic": spaces.Box(0, 1, shape=(1,), dtype=np.int64),
            "prompt_index": spaces.Box(0, len(core.prompt_list) - 1, shape=(1,), dtype=np.int64),
        }
    )


def _batched_observation(td) -> dict[str, torch.Tensor]:
    return {
        "latent": td.get("latent"),
        "step": td.get("step").unsqueeze(-1),
        "sigma": td.get("sigma").unsqueeze(-1),
        "sigma_next": td.get("sigma_next").unsqueeze(-1),
        "stochastic": td.get("stochastic").long().unsqueeze(-1),
        "prompt_index": td.get("prompt_index").unsqueeze(-1),
    }


def _reward_terms(td) -> dict[str, torch.Tensor]:
    return {k: v.reshape(-1) for k, v in td.get("reward_terms").items()}


class FlowDenoiseGymEnv(gym.Env):
    """A single denoising episode as a gymnasium environment with numpy observations.

    Observations are ``observation_space_for``'s six entries; ``info["prompt"]`` holds the prompt text
    and, at the terminal step, ``info["reward_terms"]`` each named reward.

    ``backend_factory`` builds the backend lazily (so registration stays cheap); the remaining
    keyword arguments go to ``FlowDenoiseEnv`` (``num_prompts`` and ``group_size`` are fixed to 1).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        backend: FlowBackend | Callable[[], FlowBackend],
        *,
        latent_bound: float = DEFAULT_LATENT_BOUND,
        render_mode: str | None = None,
        **env_kwargs: Any,
    ) -> None:
        for key in ("num_prompts", "group_size"):
            if env_kwargs.pop(key, 1) != 1:
                raise ValueError(f"{key} is fixed to 1 in the single gymnasium env; use gym.make_vec for batches")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array'; got {render_mode!r}")
        backend = backend() if callable(backend) and not isinstance(backend, FlowBackend) else backend
        self.core = FlowDenoiseEnv(backend, num_prompts=1, group_size=1, **env_kwargs)
        self.render_mode = render_mode
        self.observation_space = observation_space_for(self.core, latent_bound)
        self.action_space = spaces.Box(-latent_bound, latent_bound, shape=backend.latent_shape, dtype=np.float32)
        self._last_td = None

    def make_policy(self, **overrides):
        return self.core.make_policy(**overrides)

    def _numpy_observation(self, td) -> dict[str, Any]:
        space = self.observation_space
        return {
            key: value[0].detach().cpu().numpy().astype(space[key].dtype)
            for key, value in _batched_observation(td).items()
        }

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self.core.set_seed(seed)
        td_in = None
        if options and "prompt" in options:
            from tensordict import NonTensorStack, TensorDict

            td_in = TensorDict({}, batch_size=self.core.batch_size)
            td_in.set("prompt", NonTensorStack(str(options["prompt"]), batch_size=self.core.batch_size))
        td = self.core.reset(td_in)
        self._last_td = td
        return self._numpy_observation(td), {"prompt": td.get("prompt").tolist()[0]}

    def step(self, action):
        if self._last_td is None:
            raise RuntimeError("step() before reset(): call reset() first")
        action_array = np.asarray(action)
        expected = self.action_space.shape
        if action_array.shape != expected:
            raise ValueError(f"action must have shape {expected} (the next latent); got {action_array.shape}")
        if action_array.dtype != np.float32:
            raise ValueError(f"action must have dtype float32; got {action_array.dtype}")
        if not np.isfinite(action_array).all():
            raise ValueError("action holds NaN or inf; the next latent must be finite")
        td = self._last_td.clone(recurse=False)
        td.set("action", torch.as_tensor(action_array, device=self.core.device).unsqueeze(0))
        next_td = self.core.step(td).get("next")
        self._last_td = next_td
        terminated = bool(next_td.get("terminated")[0, 0])
        info: dict[str, Any] = {"prompt": next_td.get("prompt").tolist()[0]}
        if terminated:
            info["reward_terms"] = {k: float(v[0]) for k, v in _reward_terms(next_td).items()}
        reward = float(next_td.get("reward")[0, 0])
        return self._numpy_observation(next_td), reward, terminated, False, info

    def render(self):
        if self.render_mode != "rgb_array" or self._last_td is None:
            return None
        images = self.core.backend.decode(self._last_td.get("latent"))[0]
        array = (images.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


class FlowDenoiseVectorEnv(VectorEnv):
    """``num_envs`` denoising episodes stepping together, on torch tensors (native batching).

    ``num_envs`` must be a multiple of ``group_size`` (the GRPO group); prompts are drawn per
    group. Autoreset mode ``SAME_STEP`` (set as the attribute and in ``metadata``).
    Observations are ``observation_space_for``'s six entries batched as torch tensors (``(num_envs, 1)``
    for the scalars); at the terminal step ``infos`` holds ``reward_terms`` (and, in ``SAME_STEP``
    mode, ``final_obs`` / ``final_info``). There is no prompt text in the observation or the infos.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(
        self,
        backend: FlowBackend | Callable[[], FlowBackend],
        num_envs: int,
        *,
        group_size: int = 1,
        latent_bound: float = DEFAULT_LATENT_BOUND,
        autoreset_mode: AutoresetMode | str = AutoresetMode.SAME_STEP,
        **env_kwargs: Any,
    ) -> None:
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1; got {num_envs!r}")
        if not isinstance(group_size, int) or group_size < 1 or num_envs % group_size:
            raise ValueError(
                f"group_size {group_size!r} must be a positive divisor of num_envs {num_envs}; "
                f"accepted: {[g for g in range(1, num_envs + 1) if num_envs % g == 0]}"
            )
        env_kwargs.pop("num_prompts", None)
        mode = AutoresetMode(autoreset_mode)
        if mode not in (AutoresetMode.SAME_STEP, AutoresetMode.DISABLED):
            raise ValueError(f"autoreset_mode must be SAME_STEP or DISABLED; got {mode}")
        backend = backend() if callable(backend) and not isinstance(backend, FlowBackend) else backend
        self.core = FlowDenoiseEnv(backend, num_prompts=num_envs // group_size, group_size=group_size, **env_kwargs)
        self.num_envs = num_envs
        self.autoreset_mode = mode
        self.metadata = {**type(self).metadata, "autoreset_mode": mode}
        self.single_observation_space = observation_space_for(self.core, latent_bound)
        self.single_action_space = spaces.Box(-latent_bound, latent_bound, shape=backend.latent_shape, dtype=np.float32)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.device = self.core.device
        self._last_td = None

    def make_policy(self, **overrides):
        return self.core.make_policy(**overrides)

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None):
        if isinstance(seed, (list, tuple)):
            seed = seed[0]
        super().reset(seed=seed)
        if seed is not None:
            self.core.set_seed(seed)
        td = self.core.reset()
        self._last_td = td
        return _batched_observation(td), {}

    def step(self, actions):
        if self._last_td is None:
            raise RuntimeError("step() before reset(): call reset() first")
        actions = torch.as_tensor(actions, device=self.core.device)
        td = self._last_td.clone(recurse=False)
        td.set("action", actions)
        next_td = self.core.step(td).get("next")
        terminated = next_td.get("terminated").reshape(-1)
        truncated = next_td.get("truncated").reshape(-1)
        rewards = next_td.get("reward").reshape(-1)
        infos: dict[str, Any] = {}
        if bool(terminated.any()):
            infos["reward_terms"] = _reward_terms(next_td)
            infos["_reward_terms"] = terminated.clone()
            if self.autoreset_mode == AutoresetMode.SAME_STEP:
                # the whole batch finishes together: keep the terminal observation, start anew
                infos["final_obs"] = _batched_observation(next_td)
                infos["_final_obs"] = terminated.clone()
                infos["final_info"] = {"reward_terms": infos["reward_terms"]}
                infos["_final_info"] = terminated.clone()
                next_td = self.core.reset()
        self._last_td = next_td
        return _batched_observation(next_td), rewards, terminated, truncated, infos

    def close_extras(self, **kwargs: Any) -> None:
        self._last_td = None
