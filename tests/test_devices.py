"""The same paths on every available device (CPU always; CUDA when the machine has it)."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from algos.trainer import Trainer
from flowgym.kernels import flow_sde_step, gaussian_kl, gaussian_log_prob
from flowgym.policy import FlowPolicy
from flowgym.registration import make_env
from tests.test_trainer import CONFIGS, SMALL

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_on_device_match_cpu(device):
    gen = torch.Generator().manual_seed(0)
    x, v, x_next = (torch.randn(4, 16, 8, 8, generator=gen) for _ in range(3))
    sigma, sigma_next = torch.tensor([1.0, 0.9, 0.5, 0.2]), torch.tensor([0.9, 0.8, 0.3, 0.1])
    mean_cpu, std_cpu = flow_sde_step(x, v, sigma, sigma_next, 0.7)
    mean, std = flow_sde_step(x.to(device).bfloat16(), v.to(device).bfloat16(), sigma.to(device), sigma_next.to(device), 0.7)
    assert mean.dtype == torch.float32 and mean.device.type == device
    lp = gaussian_log_prob(x_next.to(device), mean, std)
    assert lp.dtype == torch.float32
    # bf16 inputs are upcast: only the bf16 rounding of x and v separates the results
    assert torch.allclose(mean.cpu(), mean_cpu, atol=0.05)
    assert torch.allclose(gaussian_kl(mean, mean, std).cpu(), torch.zeros(4))


@pytest.mark.parametrize("device", DEVICES)
def test_digits_rollout_on_device(device):
    env = make_env("digits", num_prompts=2, group_size=4, device=device, seed=0)
    policy = FlowPolicy(env.backend, seed=0)
    with torch.no_grad():
        td = env.rollout(env.num_steps, policy, break_when_any_done=True)
    assert td.get("action").device.type == device
    reward = td.get(("next", "reward"))[:, -1]
    assert torch.isfinite(reward).all() and (reward > 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_fused_rollout_matches_torchrl_loop_on_device(device):
    from torchrl.envs import EnvBase

    runs = []
    for generic in (False, True):
        env = make_env("digits", num_prompts=2, group_size=4, device=device, seed=0, stochastic_steps={"window": 3, "range": [0, 8]})
        policy = FlowPolicy(env.backend, seed=0)
        with torch.no_grad():
            runs.append(EnvBase.rollout(env, env.num_steps, policy) if generic else env.rollout(env.num_steps, policy))
    fused, loop = runs
    for key in ("latent", "velocity", "loc", "action", ("next", "latent"), ("next", "reward"), "scale"):
        assert torch.equal(fused.get(key), loop.get(key)), key
    torch.testing.assert_close(fused.get("sample_log_prob"), loop.get("sample_log_prob"), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_trainer_iteration_on_device(device, tmp_path):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*(o for o in SMALL if not o.startswith("device=")), f"device={device}", "trainer.iterations=2"])
    rows = Trainer(OmegaConf.to_container(cfg, resolve=True), tmp_path, progress=False).train()
    last = rows[-1]
    assert last["iteration"] == 2 and last["loss_objective"] is not None and last["drift_kl"] > 0
