"""``FlowDenoiseEnv``: the denoising process of a flow model as a batched TorchRL environment.

One episode is one image generation: K denoising steps over a batch of B = prompts x group size
latents, all stepping together on one device.

* reset: draws ``num_prompts`` prompts from the prompt list (without replacement when the list is
  long enough, with replacement otherwise; or takes them from the input tensordict's ``prompt``
  entry), repeats each ``group_size`` times (a GRPO group), draws the initial
  noise from the env's seeded generator (optionally shared within a group) and chooses which steps
  are stochastic this episode;
* observation: ``latent``, ``step``, ``sigma``, ``sigma_next``, ``stochastic``, ``prompt`` (text),
  ``prompt_index``, ``group_id``, ``conditioning`` (the backend's cached prompt encoding) and
  ``reward_terms`` (each named reward, non-zero at the terminal step only);
* action: the next latent (float32, the latent's shape), e.g. sampled by ``flowgym.policy.FlowPolicy``;
* the terminal step decodes the final latents and returns the weighted reward total as ``reward``.

``env.rollout(env.num_steps, policy)`` with a ``flowgym.policy.FlowPolicy`` runs the whole episode
in one fused loop (``flowgym.rollout``) that gives TorchRL's generic loop bit for bit, without its
per-step bookkeeping; every other call goes through TorchRL's loop.

Which steps are stochastic (the only ones an algorithm trains on) is set by ``stochastic_steps``:

* ``"all_but_last"`` (Flow-GRPO), ``"all"``, ``"none"`` (ODE sampling, for evaluation);
* ``{"window": W, "range": [lo, hi]}``: a random window of W consecutive steps inside steps
  ``lo .. hi - 1``, drawn per episode for the whole batch (Flow-GRPO-Fast, the Flow-DPPO recipe);
* ``{"window": W, "range": [lo, hi], "slide_every": N, "stride": s}``: MixGRPO's sliding window,
  deterministic: it starts at ``lo`` and moves by ``s`` steps every ``N`` training iterations
  (``env.iteration``, which the trainer sets), then stays at the last position ``hi - W``
  (MixGRPO: W = 4, N = 25, s = 1, ODE outside the window);
* an explicit list of step indices.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor
from tensordict import NonTensorData, NonTensorStack, TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, NonTensor, Unbounded
from torchrl.envs import EnvBase

from flowgym.backends.base import FlowBackend
from flowgym.backends.prompts import load_prompts
from flowgym.hub import resolve_device
from flowgym.rewards import RewardComposer
from flowgym.schedules import make_sigmas
from flowgym.td_utils import as_string_list, set_prebuilt, stack_non_tensors

__all__ = ["EpisodeState", "FlowDenoiseEnv", "resolve_prompts", "sliding_window_start", "stochastic_step_mask"]

StochasticSpec = str | Sequence[int] | Mapping[str, object]


def resolve_prompts(backend: FlowBackend, prompts: str | Sequence[str]) -> list[str]:
    """A list of prompts from a prompt-set name of ``backend``, a ``.txt`` file (one prompt a
    line) or a list; files and lists are read and checked by ``flowgym.backends.prompts.load_prompts``."""
    if isinstance(prompts, str) and not (prompts.endswith(".txt") or Path(prompts).is_file()):
        return backend.resolve_prompt_set(prompts)  # unknown names list the backend's sets
    return load_prompts(prompts)


def sliding_window_start(lo: int, hi: int, window: int, iteration: int, slide_every: int, stride: int) -> int:
    """MixGRPO's window position at a training iteration: ``lo + (iteration // slide_every) * stride``,
    held at the last position ``hi - window`` once it gets there."""
    return lo + min((iteration // slide_every) * stride, hi - lo - window)


def _positive_int(spec: Mapping[str, object], key: str, default: int, accepted: str) -> int:
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"stochastic_steps {key!r} must be an integer >= 1; got {value!r}. Accepted: {accepted}")
    return value


def stochastic_step_mask(
    spec: StochasticSpec, num_steps: int, generator: torch.Generator | None = None, iteration: int = 0
) -> torch.Tensor:
    """Boolean mask of length ``num_steps``: which steps are stochastic (trained) this episode.

    ``iteration`` (the training iteration) places a sliding window; the other forms ignore it.
    """
    mask = torch.zeros(num_steps, dtype=torch.bool)
    accepted = (
        "'all_but_last', 'all', 'none', a list of step indices, {'window': W, 'range': [lo, hi]} (random "
        "window) or {'window': W, 'range': [lo, hi], 'slide_every': N, 'stride': s} (sliding window)"
    )
    if isinstance(spec, str):
        if spec == "all_but_last":
            mask[: max(num_steps - 1, 0)] = True
        elif spec == "all":
            mask[:] = True
        elif spec != "none":
            raise ValueError(f"unknown stochastic_steps {spec!r}; accepted: {accepted}")
        return mask
    if isinstance(spec, Mapping):
        if "window" not in spec:
            raise ValueError(f"stochastic_steps mapping needs 'window'; accepted: {accepted}")
        unknown = sorted(set(spec) - {"window", "range", "slide_every", "stride"})
        if unknown:
            raise ValueError(f"unknown stochastic_steps keys {unknown}; accepted: {accepted}")
        window = int(spec["window"])
        lo, hi = (int(v) for v in spec.get("range", (0, num_steps)))
        if not (0 <= lo < hi <= num_steps) or not (1 <= window <= hi - lo):
            raise ValueError(
                f"stochastic window {window} in range [{lo}, {hi}) does not fit {num_steps} steps; "
                "need 0 <= lo < hi <= num_steps and 1 <= window <= hi - lo"
            )
        if "slide_every" in spec or "stride" in spec:
            slide_every = _positive_int(spec, "slide_every", 25, accepted)
            stride = _positive_int(spec, "stride", 1, accepted)
            start = sliding_window_start(lo, hi, window, int(iteration), slide_every, stride)
        else:
            start = lo + int(torch.randint(0, hi - lo - window + 1, (), generator=generator))
        mask[start : start + window] = True
        return mask
    indices = [int(i) for i in spec]
    bad = [i for i in indices if not 0 <= i < num_steps]
    if bad:
        raise ValueError(f"stochastic step indices {bad} out of range; accepted 0 .. {num_steps - 1}")
    mask[indices] = True
    return mask


@dataclass
class EpisodeState:
    """The episode in progress: what ``FlowDenoiseEnv.start_episode`` draws and the steps advance.

    ``latent`` (B, *latent_shape) is the current state at step ``step``; ``prompts`` (B strings),
    ``prompt_index`` and ``group_id`` (B,) and ``conditioning`` (the backend's encoding, batch B) are
    fixed for the episode, as is ``stochastic_mask`` (K,). ``prompt_stack`` is the prompts as one
    read-only ``NonTensorStack``; ``reward_terms`` is None until something needs the (zero) terms,
    and holds the scores after the terminal step; ``images`` are the decoded final images.
    """

    latent: Tensor
    step: int
    prompts: list[str]
    prompt_index: Tensor
    group_id: Tensor
    conditioning: TensorDictBase
    stochastic_mask: Tensor
    prompt_stack: NonTensorStack
    reward_terms: TensorDict | None = None
    images: Tensor | None = None


class FlowDenoiseEnv(EnvBase):
    """Batched TorchRL environment over the denoising MDP of ``backend``.

    Besides TorchRL's ``reset`` / ``step`` / ``rollout``, the episode API is public for loops that
    drive the env without TorchRL's per-step bookkeeping (``flowgym.rollout``): ``start_episode``,
    ``episode`` (the ``EpisodeState``), ``finish_episode`` and ``prompts_from_request``.

    Args:
        backend: the model family (velocity model, prompt encoder, decoder).
        num_prompts: prompts per batch (P); the batch size is ``P * group_size``.
        group_size: samples per prompt (G), the group of group-relative advantages.
        num_steps: denoising steps K per episode.
        shift: the schedule's static shift, ``"dynamic"`` (FLUX's default mu, see ``flowgym.schedules``),
            ``"model"`` (the backend's own scheduler: ``backend.sigma_schedule``, e.g. a diffusers
            model's dynamic shift at its resolution) or None (``backend.default_shift()``).
        prompts: a list, a ``.txt`` file, or a prompt-set name of the backend (``"train"``).
        rewards: ``{reward_name: weight}`` or a ``RewardComposer`` (default: the backend's
            ``default_rewards()``).
        reward_kwargs: per-reward constructor arguments, ``{reward_name: {...}}``.
        stochastic_steps: see the module docstring.
        share_initial_noise: one initial noise per group instead of one per sample.
        device: where latents live (default: the backend's device).
        seed: seeds prompt draws, initial noise and stochastic windows.
        prompt_shard: ``(rank, world_size)`` of a multi-process run: each reset draws the prompts of all
            ``world_size`` processes (``num_prompts`` each) from the one stream ``seed`` seeds, the same
            on every process, and keeps the ``rank``-th share; stochastic windows come from that stream
            too. ``(0, 1)`` (default): one process.
        noise_seed: seeds a separate stream for the initial noise (a multi-process run gives each rank
            its own); None: the initial noise comes from the ``seed`` stream, interleaved with the prompts.
        policy_defaults: keyword arguments of ``FlowPolicy`` that ``make_policy()`` uses.
    """

    batch_locked = True

    def __init__(
        self,
        backend: FlowBackend,
        *,
        num_prompts: int = 4,
        group_size: int = 8,
        num_steps: int = 10,
        shift: float | str | None = 3.0,
        prompts: str | Sequence[str] = "train",
        rewards: Mapping[str, float] | RewardComposer | None = None,
        reward_kwargs: Mapping[str, Mapping] | None = None,
        stochastic_steps: StochasticSpec = "all_but_last",
        share_initial_noise: bool = False,
        device: torch.device | str | None = None,
        seed: int | None = None,
        policy_defaults: Mapping[str, object] | None = None,
        prompt_shard: tuple[int, int] = (0, 1),
        noise_seed: int | None = None,
    ) -> None:
        for name, value, low in (("num_prompts", num_prompts, 1), ("group_size", group_size, 1), ("num_steps", num_steps, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
        device = resolve_device(device) if device is not None else backend.device  # no CUDA: a clear ValueError
        batch = num_prompts * group_size
        super().__init__(device=device, batch_size=torch.Size([batch]))
        self.backend = backend
        self.num_prompts = num_prompts
        self.group_size = group_size
        self.num_steps = num_steps
        if shift is None:
            shift = backend.default_shift()
        self.shift = shift
        if shift == "model":
            self.sigmas = backend.sigma_schedule(num_steps).to(torch.float32).to(device)
        else:
            image_seq_len = None
            if shift == "dynamic":
                image_seq_len = (backend.latent_shape[-1] // 2) * (backend.latent_shape[-2] // 2)
            self.sigmas = make_sigmas(num_steps, shift, image_seq_len).to(device)
        self.prompt_list = resolve_prompts(backend, prompts)
        if rewards is None:
            rewards = backend.default_rewards()
        self.rewards = rewards if isinstance(rewards, RewardComposer) else RewardComposer(rewards, reward_kwargs)
        self.rewards.to(device)
        self.stochastic_spec = stochastic_steps
        stochastic_step_mask(stochastic_steps, num_steps)  # validate now, not at the first reset
        #: the training iteration, the clock of a sliding stochastic window (the trainer sets it)
        self.iteration = 0
        self.share_initial_noise = bool(share_initial_noise)
        self.policy_defaults = dict(policy_defaults or {})
        self._generator = torch.Generator()
        self._generator.manual_seed(seed if seed is not None else int(torch.seed() % 2**62))
        rank, world = (int(v) for v in prompt_shard)
        if not (world >= 1 and 0 <= rank < world):
            raise ValueError(f"prompt_shard must be (rank, world_size) with 0 <= rank < world_size; got {prompt_shard!r}")
        self.prompt_shard = (rank, world)
        self._noise_generator: torch.Generator | None = None
        if noise_seed is not None:
            self._noise_generator = torch.Generator().manual_seed(int(noise_seed))
        self._episode: EpisodeState | None = None
        self._defer_rewards = False  # see rewards_deferred()
        self._make_specs()

    # ------------------------------------------------------------------ specs
    def _make_specs(self) -> None:
        B, K = self.batch_size[0], self.num_steps
        shape = (B, *self.backend.latent_shape)
        dev = self.device
        cond_example = self.backend.encode_prompts(self.prompt_list[:1]).to(dev)
        cond_spec = Composite(
            {
                key: Unbounded(shape=(B, *value.shape[1:]), dtype=value.dtype, device=dev)
                for key, value in cond_example.items(include_nested=True, leaves_only=True)
            },
            shape=(B,),
            device=dev,
        )
        self.observation_spec = Composite(
            latent=Unbounded(shape=shape, dtype=torch.float32, device=dev),
            step=Bounded(low=0, high=K, shape=(B,), dtype=torch.int64, device=dev),
            sigma=Bounded(low=0.0, high=1.0, shape=(B,), dtype=torch.float32, device=dev),
            sigma_next=Bounded(low=0.0, high=1.0, shape=(B,), dtype=torch.float32, device=dev),
            stochastic=Categorical(n=2, shape=(B,), dtype=torch.bool, device=dev),
            prompt=NonTensor(shape=(B,), device=dev, example_data=self.prompt_list[0]),
            prompt_index=Bounded(low=0, high=len(self.prompt_list) - 1, shape=(B,), dtype=torch.int64, device=dev),
            group_id=Bounded(low=0, high=self.num_prompts - 1, shape=(B,), dtype=torch.int64, device=dev),
            conditioning=cond_spec,
            reward_terms=Composite(
                {name: Unbounded(shape=(B, 1), dtype=torch.float32, device=dev) for name in self.rewards.names},
                shape=(B,),
                device=dev,
            ),
            shape=(B,),
            device=dev,
        )
        self.action_spec = Unbounded(shape=shape, dtype=torch.float32, device=dev)
        self.reward_spec = Unbounded(shape=(B, 1), dtype=torch.float32, device=dev)
        self.done_spec = Composite(
            {key: Categorical(n=2, shape=(B, 1), dtype=torch.bool, device=dev) for key in ("done", "terminated", "truncated")},
            shape=(B,),
            device=dev,
        )

    # ------------------------------------------------------------------ helpers
    @property
    def episode(self) -> EpisodeState:
        """The episode in progress (``RuntimeError`` before the first reset)."""
        if self._episode is None:
            raise RuntimeError("the environment has not been reset")
        return self._episode

    @property
    def episode_stochastic_mask(self) -> torch.Tensor:
        """The current episode's per-step stochastic mask (length K)."""
        return self.episode.stochastic_mask

    def make_policy(self, **overrides):
        """A ``FlowPolicy`` on this env's backend with the env's policy defaults (and overrides)."""
        from flowgym.policy import FlowPolicy  # the policy sits beside the env, not below it

        return FlowPolicy(self.backend, **{**self.policy_defaults, **overrides})

    def _draw_prompts(self) -> list[int]:
        """This process's ``num_prompts`` prompt indices: its share of the draw for all processes."""
        n = len(self.prompt_list)
        rank, world = self.prompt_shard
        total = self.num_prompts * world
        if total <= n:
            order = torch.randperm(n, generator=self._generator)[:total]
        else:
            order = torch.randint(0, n, (total,), generator=self._generator)
        return order[rank * self.num_prompts : (rank + 1) * self.num_prompts].tolist()

    def _prompt_stack(self, prompts: list[str]) -> NonTensorStack:
        """A ``NonTensorStack`` of the prompts, stacked from cached per-prompt leaves (read-only)."""
        cache = self.__dict__.setdefault("_prompt_leaves", {})
        for prompt in prompts:
            if prompt not in cache:
                cache[prompt] = NonTensorData(prompt, batch_size=[], device=self.device)
        return stack_non_tensors([cache[p] for p in prompts], stack_dim=0)

    def _observation(self) -> TensorDict:
        state = self.episode
        B, k = self.batch_size[0], int(state.step)
        dev = self.device
        finished = k >= self.num_steps
        sigma = self.sigmas[k]
        sigma_next = self.sigmas[k + 1] if not finished else self.sigmas[k]
        stochastic = bool(state.stochastic_mask[k]) if not finished else False
        obs = TensorDict(
            {
                "latent": state.latent,
                "step": torch.full((B,), k, dtype=torch.int64, device=dev),
                "sigma": sigma.expand(B).clone(),
                "sigma_next": sigma_next.expand(B).clone(),
                "stochastic": torch.full((B,), stochastic, dtype=torch.bool, device=dev),
                "prompt_index": state.prompt_index,
                "group_id": state.group_id,
                "conditioning": state.conditioning,
                "reward_terms": self._reward_terms(),
            },
            batch_size=[B],
            device=dev,
        )
        set_prebuilt(obs, "prompt", state.prompt_stack)
        return obs

    # ------------------------------------------------------------------ EnvBase hooks
    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        self.start_episode(self.prompts_from_request(tensordict))
        return self.reset_observation()

    def reset_observation(self) -> TensorDict:
        """The observation at step 0 of the episode just started, with its (False) done flags."""
        B, dev = self.batch_size[0], self.device
        obs = self._observation()
        obs.set("done", torch.zeros(B, 1, dtype=torch.bool, device=dev))
        obs.set("terminated", torch.zeros(B, 1, dtype=torch.bool, device=dev))
        obs.set("truncated", torch.zeros(B, 1, dtype=torch.bool, device=dev))
        return obs

    def prompts_from_request(self, tensordict: TensorDictBase | None) -> list[str] | None:
        """The prompts a reset request names (its ``prompt`` entry, one per batch element), or None."""
        if tensordict is None or "prompt" not in tensordict.keys():
            return None
        explicit = tensordict.get("prompt")
        explicit = as_string_list(explicit)
        if len(explicit) != self.batch_size[0]:
            raise ValueError(f"reset got {len(explicit)} prompts; expected one per batch element ({self.batch_size[0]})")
        return [str(p) for p in explicit]

    def start_episode(self, prompts: list[str] | None = None) -> EpisodeState:
        """Draw (or take) the prompts, the initial noise and the stochastic steps of a new episode.

        ``prompts``: one per batch element, or None to draw ``num_prompts`` and repeat each
        ``group_size`` times. Returns the new ``EpisodeState`` (also ``env.episode``).
        """
        B, G = self.batch_size[0], self.group_size
        dev = self.device
        if prompts is not None:
            index_of = {p: i for i, p in enumerate(self.prompt_list)}
            prompt_index = torch.tensor([index_of.get(p, 0) for p in prompts], dtype=torch.int64)
        else:
            chosen = self._draw_prompts()
            prompts = [self.prompt_list[i] for i in chosen for _ in range(G)]
            prompt_index = torch.tensor(chosen, dtype=torch.int64).repeat_interleave(G)
        shape = self.backend.latent_shape
        noise_stream = self._noise_generator if self._noise_generator is not None else self._generator
        if self.share_initial_noise:
            noise = torch.randn((self.num_prompts, *shape), generator=noise_stream).repeat_interleave(G, dim=0)
        else:
            noise = torch.randn((B, *shape), generator=noise_stream)
        mask = stochastic_step_mask(self.stochastic_spec, self.num_steps, self._generator, self.iteration)
        self._episode = EpisodeState(
            latent=noise.to(dev),
            step=0,
            prompts=prompts,
            prompt_index=prompt_index.to(dev),
            group_id=torch.arange(B, device=dev) // G,
            conditioning=self.backend.encode_prompts(prompts).to(dev),
            stochastic_mask=mask,
            # built once per episode: a stack of B strings is costly to build and to validate
            prompt_stack=self._prompt_stack(prompts),
        )
        return self._episode

    def _reward_terms(self) -> TensorDict:
        """The episode's reward terms: zeros until the terminal step, built the first time they are needed."""
        state = self.episode
        if state.reward_terms is None:
            B, dev = self.batch_size[0], self.device
            state.reward_terms = TensorDict(
                {name: torch.zeros(B, 1, device=dev) for name in self.rewards.names}, batch_size=[B], device=dev
            )
        return state.reward_terms

    def finish_episode(self, final_latent: Tensor) -> tuple[Tensor, TensorDict]:
        """Decode the final latents and score them: ``(reward (B, 1), reward_terms)``.

        Keeps the images in ``episode.images``; the caller records the final state (``episode.latent``,
        ``episode.step``, ``episode.reward_terms``).
        """
        state = self.episode
        B, dev = self.batch_size[0], self.device
        # the decoder runs in its own precision, never under a caller's autocast
        with torch.no_grad(), torch.autocast(device_type=final_latent.device.type, enabled=False):
            images = self.backend.decode(final_latent)
        if self._defer_rewards:  # the caller scores last_images itself: NaN, so that no one reads a placeholder as a reward
            total = torch.full((B,), float("nan"), device=dev)
            terms = {name: total for name in self.rewards.names}
        else:
            total, terms = self.score_images(images, state.prompts)
        state.images = images
        reward_terms = TensorDict({name: value.reshape(B, 1) for name, value in terms.items()}, batch_size=[B], device=dev)
        return total.reshape(B, 1), reward_terms

    def score_images(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """``(reward (B,), {term: (B,)})`` of decoded ``images`` on the env's device: the weighted total
        and every term, the reward models in their own precision (never under a caller's autocast)."""
        with torch.no_grad(), torch.autocast(device_type=images.device.type, enabled=False):
            total, terms = self.rewards(images, prompts)
        dev = self.device
        return total.to(dev).reshape(-1), {name: value.to(dev).reshape(-1) for name, value in terms.items()}

    @contextlib.contextmanager
    def rewards_deferred(self) -> Iterator[None]:
        """Episodes finished inside this block are decoded but not scored: their reward and reward terms
        are NaN, and the caller scores ``last_images`` with ``rewards`` itself (the trainer does so in a
        background thread, overlapping the reward models or a reward server with the next rollout)."""
        previous, self._defer_rewards = self._defer_rewards, True
        try:
            yield
        finally:
            self._defer_rewards = previous

    def validate_action(self, action: object) -> torch.Tensor:
        """Check an action; ``ValueError`` saying what was expected. Never changes the state."""
        expected_shape = (self.batch_size[0], *self.backend.latent_shape)
        if not isinstance(action, torch.Tensor):
            raise ValueError(f"action must be a torch.Tensor of shape {expected_shape}; got {type(action).__name__}")
        if tuple(action.shape) != expected_shape:
            raise ValueError(f"action must have shape {expected_shape} (the next latent); got {tuple(action.shape)}")
        if action.dtype != torch.float32:
            raise ValueError(f"action must have dtype torch.float32; got {action.dtype}")
        if action.device != self.device:
            raise ValueError(f"action must be on device {self.device}; got {action.device}")
        if not bool(torch.isfinite(action).all()):
            raise ValueError("action holds NaN or inf; the next latent must be finite")
        return action

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        if self._episode is None:
            raise RuntimeError("step() before reset(): call reset() first")
        state = self._episode
        k = int(state.step)
        if k >= self.num_steps:
            raise RuntimeError(
                f"the episode finished after {self.num_steps} steps; call reset() before stepping again"
            )
        action = self.validate_action(tensordict.get("action"))
        B = self.batch_size[0]
        dev = self.device
        done = k + 1 == self.num_steps
        reward = torch.zeros(B, 1, device=dev)
        reward_terms = self._reward_terms()
        if done:
            reward, reward_terms = self.finish_episode(action)
        state.latent, state.step, state.reward_terms = action.clone(), k + 1, reward_terms
        out = self._observation()
        out.set("reward", reward)
        flag = torch.full((B, 1), done, dtype=torch.bool, device=dev)
        out.set("done", flag)
        out.set("terminated", flag.clone())
        out.set("truncated", torch.zeros(B, 1, dtype=torch.bool, device=dev))
        return out

    def rollout(
        self,
        max_steps: int,
        policy: Callable[[TensorDictBase], TensorDictBase] | None = None,
        callback: Callable[..., Any] | None = None,
        *,
        auto_reset: bool = True,
        tensordict: TensorDictBase | None = None,
        **kwargs: Any,
    ) -> TensorDictBase:
        """TorchRL's ``EnvBase.rollout``, fused for the usual call.

        A whole episode with a ``flowgym.policy.FlowPolicy`` (``env.rollout(env.num_steps, policy)``,
        optionally with a reset request holding ``prompt``) runs in one loop over bare tensors
        (``flowgym.rollout``): the same trajectory, without TorchRL's per-step bookkeeping. Every
        other call (another policy, a callback, a partial episode, ``auto_reset=False``, ...) is
        TorchRL's loop unchanged.
        """
        from flowgym.rollout import fused_rollout, fused_rollout_applies  # beside the env, not below it

        if fused_rollout_applies(self, max_steps, policy, callback, auto_reset, tensordict, kwargs):
            trajectory = fused_rollout(self, policy, tensordict)
            if trajectory is not None:
                return trajectory
            # the policy cannot plan this episode: run TorchRL's loop from the reset just made
            tensordict, auto_reset = self.reset_observation(), False
        return super().rollout(max_steps, policy, callback, auto_reset=auto_reset, tensordict=tensordict, **kwargs)

    def generator_state(self) -> torch.Tensor | dict[str, torch.Tensor]:
        """State of the env's generator (prompt draws, initial noise, windows), for checkpoints; with a
        separate noise stream (``noise_seed``) ``{"shared": ..., "noise": ...}``."""
        if self._noise_generator is None:
            return self._generator.get_state()
        return {"shared": self._generator.get_state(), "noise": self._noise_generator.get_state()}

    def set_generator_state(self, state: torch.Tensor | Mapping[str, torch.Tensor]) -> None:
        if isinstance(state, Mapping):
            self._generator.set_state(state["shared"])
            if self._noise_generator is None:
                self._noise_generator = torch.Generator()
            self._noise_generator.set_state(state["noise"])
        else:
            self._generator.set_state(state)

    def set_noise_seed(self, seed: int) -> None:
        """Re-seed the separate initial-noise stream (creating it if there is none)."""
        self._noise_generator = torch.Generator().manual_seed(int(seed))

    def _set_seed(self, seed: int | None) -> None:
        self._generator.manual_seed(int(seed) if seed is not None else int(torch.seed() % 2**62))

    @property
    def last_images(self) -> torch.Tensor | None:
        """The decoded images of the last finished episode (None before one finishes)."""
        return None if self._episode is None else self._episode.images
