"""The configs of the diffusers families (SD3 / SD3.5, FLUX.1, FLUX.2-klein, Qwen-Image) compose and pass
every check the trainer makes before it builds a model; their gym ids are registered.

Nothing here loads weights or reaches a hub: each config goes through Hydra's compose API and then
through ``Trainer`` up to the point where it would build the backend (``flowgym.registration.make_backend``
is replaced by a stub that checks the backend options against the family's ``from_pretrained`` and
stops). Only ``test_recipe_lora_targets_exist_in_the_family_transformer`` instantiates a module: the
family's *tiny* transformer (random weights, ``flowgym.testing.tiny_pipelines``, built offline).
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import gymnasium as gym
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import flowgym  # noqa: F401  (registers the gym ids)
import flowgym.registration as registration
from algos.config import load_config, validate_config
from algos.trainer import Trainer
from flowgym.backends.base import BACKENDS, backend_class

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")

#: family -> gym id, hub id of the real model
FAMILIES = {
    "sd3": ("FlowDenoise-SD3-v0", "stabilityai/stable-diffusion-3.5-medium"),
    "flux": ("FlowDenoise-FLUX-v0", "black-forest-labs/FLUX.1-dev"),
    "flux2_klein": ("FlowDenoise-FLUX2Klein-v0", "black-forest-labs/FLUX.2-klein-base-9B"),
    "qwen_image": ("FlowDenoise-QwenImage-v0", "Qwen/Qwen-Image"),
}
#: env config -> (family, model source): the real models and their tiny offline pipelines
ENVS = {
    "sd3": ("sd3", FAMILIES["sd3"][1]),
    "flux": ("flux", FAMILIES["flux"][1]),
    "flux2_klein": ("flux2_klein", FAMILIES["flux2_klein"][1]),
    "qwen_image": ("qwen_image", FAMILIES["qwen_image"][1]),
    "sd3_tiny": ("sd3", "tiny:sd3"),
    "flux_tiny": ("flux", "tiny:flux"),
    "flux2_klein_tiny": ("flux2_klein", "tiny:flux2_klein"),
    "qwen_image_tiny": ("qwen_image", "tiny:qwen_image"),
}
#: every experiment of these families (the SD3.5 ones are checked in detail in test_sd3_env.py)
EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml") if p.stem.startswith(("sd35_", "flux")))
NEW_RECIPES = ["flux1_flow_dppo", "flux1_flow_grpo", "flux2_klein_flow_dppo", "flux2_klein_flow_grpo"]


def compose_config(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


class _ModelWouldBeBuilt(Exception):
    """Raised by the stub in place of building a backend: every check before it has passed."""


@pytest.fixture
def no_model(monkeypatch):
    """``make_backend`` checks the options as the real one does (and binds them to the family's
    ``from_pretrained``), records them and stops; nothing may reach the hub meanwhile."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    built = []

    def make_backend(name, **options):
        cls = backend_class(name)
        unknown = sorted(set(options) - set(cls.options()))
        assert not unknown, f"backend {name!r} does not accept {unknown}; accepted: {sorted(cls.options())}"
        registration.check_device(options.get("device"))
        inspect.signature(cls.from_pretrained).bind(**options)
        built.append((name, options))
        raise _ModelWouldBeBuilt

    monkeypatch.setattr(registration, "make_backend", make_backend)
    return built


def check_up_to_the_model(cfg: dict, no_model: list, tmp_path: Path) -> dict:
    """Every check the trainer makes before the model, then the backend options it would build with."""
    validate_config(cfg)
    run = load_config(cfg)
    with pytest.raises(_ModelWouldBeBuilt):
        Trainer(cfg, tmp_path, progress=False)
    assert len(no_model) == 1
    name, options = no_model[0]
    assert name == run.env.name
    return options


@pytest.mark.parametrize("env", sorted(ENVS))
def test_env_config_composes_and_passes_the_checks_before_the_model(env, no_model, tmp_path):
    family, model = ENVS[env]
    cfg = compose_config(f"env={env}", "reward=jpeg_compressibility", "device=cpu")
    e = cfg["env"]
    assert e["name"] == family and family in BACKENDS
    assert e["backend"]["model"] == model
    options = check_up_to_the_model(cfg, no_model, tmp_path)
    assert options["model"] == model and str(options["device"]) == "cpu"
    if not model.startswith("tiny:"):
        # the real configs load the hub id the family defaults to
        assert backend_class(family).default_model == model
        assert e["backend"]["resolution"] == 512


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_recipe_composes_and_passes_the_checks_before_the_model(experiment, no_model, tmp_path):
    cfg = compose_config(f"+experiment={experiment}", "device=cpu")
    assert cfg["env"]["name"] in FAMILIES
    check_up_to_the_model(cfg, no_model, tmp_path)


def test_every_new_recipe_is_found():
    assert set(NEW_RECIPES) <= set(EXPERIMENTS)


#: experiment -> (algo, env, kernel, noise, guidance, group, groups per rollout, steps, stochastic steps,
#: model, lr, lora (rank, alpha), eval (steps, guidance), loss values)
RECIPES = {
    "flux1_flow_grpo": ("grpo", "flux", "flow_sde", 0.9, 3.5, 24, 48, 6, "all_but_last",
                        "black-forest-labs/FLUX.1-dev", 3e-4, (64, 128), (28, 3.5),
                        {"clip_range": 1e-4, "beta": 0.0}),
    "flux1_flow_dppo": ("flow_dppo", "flux", "flow_sde", 0.9, 3.5, 16, 48, 6, {"window": 3, "range": [0, 3]},
                        "black-forest-labs/FLUX.1-dev", 3e-4, (64, 128), (28, 3.5),
                        {"delta": 1e-5, "beta": 0.0, "normalize": "all", "divergence": "kl"}),
    "flux2_klein_flow_grpo": ("grpo", "flux2_klein", "flow_sde", 0.7, 1.0, 16, 64, 10, {"window": 3, "range": [0, 5]},
                              "black-forest-labs/FLUX.2-klein-base-9B", 5e-5, (16, 32), (50, 4.0),
                              {"clip_range": 5e-3, "beta": 0.0}),
    "flux2_klein_flow_dppo": ("flow_dppo", "flux2_klein", "flow_sde", 0.7, 1.0, 16, 64, 10, {"window": 3, "range": [0, 5]},
                              "black-forest-labs/FLUX.2-klein-base-9B", 5e-5, (16, 32), (50, 4.0),
                              {"delta": 1e-5, "beta": 0.0, "normalize": "all", "divergence": "kl"}),
}


@pytest.mark.parametrize("experiment", sorted(RECIPES))
def test_recipe_values(experiment):
    """The published values the recipe files cite (the sources are in each file's comments)."""
    (algo, env, kernel, noise, guidance, group, groups, steps, stochastic, model, lr, lora, evaluation,
     loss) = RECIPES[experiment]
    cfg = compose_config(f"+experiment={experiment}")
    a, e, t, b = cfg["algo"], cfg["env"], cfg["trainer"], cfg["env"]["backend"]
    assert (a["name"], e["name"], a["kernel"], a["noise_level"], a["guidance_scale"]) == (algo, env, kernel, noise, guidance)
    assert {k: a["loss"][k] for k in loss} == loss
    assert (e["group_size"], e["num_prompts"] * t["rollout_batches"], e["num_steps"]) == (group, groups, steps)
    assert e["stochastic_steps"] == stochastic and e["shift"] is None
    assert (b["model"], b["resolution"], b["lora_rank"], b["lora_alpha"]) == (model, 512, *lora)
    assert (t["lr"], t["num_minibatches"], t["inner_epochs"]) == (lr, 2, 1)
    assert (t["eval_num_steps"], t["eval_guidance_scale"]) == evaluation
    assert cfg["reward"]["weights"] == {"pickscore": 1.0}
    if algo == "flow_dppo":
        assert a["advantage_kwargs"] == {"clip": None}  # Flow-DPPO: no advantage clamp


@pytest.mark.parametrize("experiment", sorted(RECIPES))
def test_recipe_lora_targets_exist_in_the_family_transformer(experiment):
    """Every LoRA target a recipe names is the suffix of a linear layer of the family's transformer
    (peft's rule), checked on the tiny transformer of the same diffusers class (no weights loaded)."""
    from flowgym.testing.tiny_pipelines import tiny_pipeline_path

    cfg = compose_config(f"+experiment={experiment}")
    family, targets = cfg["env"]["name"], cfg["env"]["backend"]["lora_targets"]
    component = next(c for c in backend_class(family).components if c.name == "transformer")
    cls = getattr(importlib.import_module(component.library), component.class_name)
    model = cls.from_config(cls.load_config(tiny_pipeline_path(family), subfolder="transformer"))
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
    assert not missing, f"{experiment}: lora_targets {missing} match no linear layer of {component.class_name}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gym_id_is_registered_for_the_family(family):
    env_id, _ = FAMILIES[family]
    assert backend_class(family).env_id == env_id
    assert registration.env_ids()[env_id] == family
    assert env_id in gym.registry
    spec = gym.spec(env_id)
    assert spec.kwargs == {"family": family}
    assert spec.entry_point == "flowgym.registration:make_gym_env"
