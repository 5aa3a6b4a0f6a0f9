"""Built-in prompt sets for the text-to-image backends, and ``load_prompts`` for user prompts.

The named sets are small demo lists embedded as Python data (no download), written in the style
of the prompt sets the Flow-GRPO family trains on:

* ``"pickscore_demo"`` / ``"pickscore_demo_eval"``: free-form scenes for human-preference rewards
  (PickScore, aesthetic, CLIP score); the eval list is disjoint from the training list.
* ``"geneval_demo"``: compositional prompts (object counts, colours, relative positions,
  co-occurrence) in GenEval's phrasing.
* ``"ocr_demo"``: prompts asking for rendered text; the target text is the part between double
  quotes (what an OCR reward compares against).

``load_prompts(spec)`` accepts a list of strings, a path to a ``.txt`` file (one prompt a line,
blank lines skipped) or one of the names above.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

__all__ = ["PROMPT_SETS", "available_prompt_sets", "load_prompts", "PromptSpec"]

PromptSpec = Union[str, "os.PathLike[str]", Sequence[str]]

PROMPT_SETS: dict[str, tuple[str, ...]] = {
    "pickscore_demo": (
        "a cozy cabin in a snowy forest at dusk, warm light in the windows",
        "a red fox sitting in a field of lavender, golden hour",
        "an astronaut riding a horse on the moon, cinematic lighting",
        "a bowl of ramen with a soft-boiled egg, studio food photography",
        "a lighthouse on a cliff during a thunderstorm, dramatic sky",
        "a watercolor painting of a quiet canal in venice",
        "a cute corgi wearing sunglasses on a beach",
        "a futuristic city skyline at night with flying cars",
        "a steaming cup of coffee on a wooden table next to an open book",
        "an ancient library with towering bookshelves and floating candles",
        "a hummingbird drinking from a bright pink flower, macro photo",
        "a japanese garden with a red bridge over a koi pond",
        "a portrait of an old fisherman with a white beard, oil painting",
        "a hot air balloon floating over green hills at sunrise",
        "a tiny robot watering a plant on a windowsill",
        "a mountain lake reflecting snow-capped peaks, crystal clear water",
        "a steampunk owl made of brass gears",
        "a bustling night market with paper lanterns",
        "a sailboat on a calm sea under a starry sky",
        "a field of sunflowers under a blue sky with white clouds",
        "a cat sleeping on a stack of books by a fireplace",
        "a medieval castle on a hill surrounded by fog",
        "a colorful coral reef with tropical fish, underwater photo",
        "a bowl of fresh strawberries on a white marble counter",
    ),
    "pickscore_demo_eval": (
        "a panda eating bamboo in a misty bamboo forest",
        "a vintage red car parked on a cobblestone street",
        "a glass terrarium with tiny mushrooms and moss",
        "a snowy owl flying over a frozen lake",
        "a cyberpunk street food stall in the rain, neon reflections",
        "a basket of autumn apples on a porch",
        "a waterfall in a tropical jungle, long exposure",
        "a chess board with glass pieces in soft morning light",
    ),
    "geneval_demo": (
        "a photo of two dogs",
        "a photo of three apples",
        "a photo of four cups",
        "a photo of a red bench",
        "a photo of a blue umbrella",
        "a photo of a green bicycle",
        "a photo of a yellow car",
        "a photo of a purple vase",
        "a photo of a cat and a dog",
        "a photo of a bowl and a spoon",
        "a photo of a laptop and a book",
        "a photo of a pizza left of a bottle",
        "a photo of a chair right of a table",
        "a photo of a bird above a bench",
        "a photo of a clock below a lamp",
        "a photo of a black horse and a white cow",
        "a photo of a red apple and a green banana",
        "a photo of a brown teddy bear and a pink cake",
        "a photo of two cars and one bus",
        "a photo of a skateboard",
        "a photo of an orange bicycle left of a blue car",
        "a photo of three birds",
        "a photo of a white sheep right of a black cat",
        "a photo of a toothbrush and a cup",
    ),
    "ocr_demo": (
        'a storefront sign that says "OPEN"',
        'a coffee mug with the word "HELLO" printed on it',
        'a chalkboard menu reading "SOUP OF THE DAY"',
        'a neon sign glowing with the text "LATE NIGHT"',
        'a street sign that reads "MAIN ST"',
        'a birthday cake with "HAPPY BIRTHDAY" written in icing',
        'a book cover titled "THE LAST GARDEN"',
        'a t-shirt with the slogan "STAY CURIOUS"',
        'a wooden sign in a forest that says "TRAIL"',
        'a protest banner reading "SAVE THE BEES"',
        'a vintage poster with the words "GRAND HOTEL"',
        'a license plate showing "FLOW 42"',
        'a cereal box labeled "CRUNCHY OATS"',
        'a handwritten note that says "SEE YOU SOON"',
        'a billboard reading "DRINK MORE WATER"',
        'a road sign that says "STOP"',
    ),
}


def available_prompt_sets() -> list[str]:
    """Names of the built-in prompt sets accepted by ``load_prompts``."""
    return sorted(PROMPT_SETS)


def _validate(prompts: list[object], source: str) -> list[str]:
    if not prompts:
        raise ValueError(f"no prompts in {source}; give at least one prompt")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(
            f"prompts from {source} must be non-empty strings; entries {bad[:5]} are not "
            f"(first bad entry: {prompts[bad[0]]!r})"
        )
    return [str(p) for p in prompts]


def _read_txt(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {str(path)!r} does not exist (or is not a file); give a .txt file with "
            f"one prompt a line, a list of prompts, or a named set: {available_prompt_sets()}"
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() for line in lines if line.strip()]
    return _validate(prompts, f"file {str(path)!r}")


def load_prompts(spec: PromptSpec) -> list[str]:
    """Resolve a prompt specification to a list of prompts.

    Accepted forms:

    * a list / tuple of non-empty strings (returned as a new list);
    * a path (``str`` or ``os.PathLike``) to a text file with one prompt a line; surrounding
      whitespace is stripped and blank lines are skipped;
    * the name of a built-in set: ``"pickscore_demo"``, ``"pickscore_demo_eval"``,
      ``"geneval_demo"``, ``"ocr_demo"`` (see ``available_prompt_sets()``).

    Raises ``ValueError`` for an unknown name or empty / non-string prompts, and
    ``FileNotFoundError`` for a path that does not exist.
    """
    if isinstance(spec, os.PathLike):
        return _read_txt(Path(spec))
    if isinstance(spec, str):
        if spec in PROMPT_SETS:
            return list(PROMPT_SETS[spec])
        path = Path(spec).expanduser()
        if path.is_file():
            return _read_txt(path)
        looks_like_path = spec.endswith(".txt") or os.sep in spec or "/" in spec
        if looks_like_path:
            return _read_txt(path)
        raise ValueError(
            f"unknown prompt set {spec!r}; accepted: a named set {available_prompt_sets()}, "
            "a path to a .txt file with one prompt a line, or a list of prompts"
        )
    if isinstance(spec, (list, tuple)):
        return _validate(list(spec), "the given list")
    raise ValueError(
        f"prompts must be a list of strings, a path to a .txt file or a named set "
        f"{available_prompt_sets()}; got {type(spec).__name__}"
    )
