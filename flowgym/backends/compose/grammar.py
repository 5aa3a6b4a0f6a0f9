"""The compose task's prompt grammar (GenEval's six categories in miniature), its conditions and the
train / held-out split.

Categories (GenEval's names) and prompt forms, digits ``d`` in 0-4, colours ``c`` in the palette:

==============  ==============================  ============================================
category        prompt                          conditions (all must hold for strict credit)
==============  ==============================  ============================================
single_object   ``a 3``                         a 3 is present; exactly 1 object
two_object      ``a 3 and a 1``                 a 3; a 1; exactly 2 objects
counting        ``three 2s`` (two..four)        exactly three 2s; exactly 3 objects
colors          ``a green 2``                   a 2; some 2 is green; exactly 1 object
position        ``a 2 to the left of a 4``      a 2; a 4; relation holds; exactly 2 objects
                (``to the right of``, ``above``, ``below``)
color_attr      ``a red 1 and a yellow 4``      a 1; a 4; some 1 is red; some 4 is yellow;
                                                exactly 2 objects
==============  ==============================  ============================================

Strictness (documented choice): every category requires the canvas to hold *exactly* the prompt's
objects (the object-count condition), which is stricter than GenEval (GenEval only counts exactly
for counting prompts and ignores extra objects elsewhere). On a 2x2 canvas an extra object is a
visible failure of the prompt, and counting it catches the common failure mode of small models
(one object too many). The partial score is the fraction of the conditions met.

Relations on the grid: "``a`` to the left of ``b``" holds when ``col(a) < col(b)`` (rows free,
diagonals count), "right of" when ``col(a) > col(b)``, "above" when ``row(a) < row(b)``, "below"
when ``row(a) > row(b)``. Digits in two-object prompts are distinct; colours in color_attr prompts
are distinct.

Split (deterministic, no randomness): a prompt is *held out* when it names

* a held-out colour-digit pair (``HELDOUT_COLOUR_DIGITS``: red 0, green 1, blue 2, yellow 3,
  red 4),
* both digits of a held-out digit pair (``HELDOUT_DIGIT_PAIRS``: {0, 3} and {1, 4}; this holds out
  their two_object, position and color_attr prompts), or
* a held-out counting combination (``HELDOUT_COUNTS``: "two 1s", "three 4s").

Every other prompt is a train prompt. Pretraining canvases are drawn only for train prompts, with
free colours chosen among the colours allowed for the digit, so no held-out colour-digit pair, no
held-out digit pair and no held-out count ever appears in pretraining data (``scene_is_heldout``).
single_object has no held-out prompts. Prompt lists are ordered by category (the order above), then
by construction order (digits ascending, then colours in palette order, then relations).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from itertools import permutations
from typing import Sequence

import numpy as np

from flowgym.backends.compose.canvas import (
    COLOURS,
    DIGITS,
    NUM_CELLS,
    GRID,
    SceneObject,
    cell_col,
    cell_row,
)

__all__ = [
    "CATEGORIES",
    "COUNT_WORDS",
    "HELDOUT_COLOUR_DIGITS",
    "HELDOUT_COUNTS",
    "HELDOUT_DIGIT_PAIRS",
    "ObjectSpec",
    "PromptSpec",
    "RELATIONS",
    "all_prompts",
    "balanced_prompts",
    "check_conditions",
    "condition_names",
    "is_heldout_prompt",
    "parse_prompt",
    "partial_score",
    "prompt_sets",
    "relation_holds",
    "sample_scene",
    "scene_is_heldout",
    "strict_score",
]

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
_WORD_COUNTS = {w: n for n, w in COUNT_WORDS.items()}
RELATIONS = ("left of", "right of", "above", "below")
_RELATION_TEXT = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}

HELDOUT_COLOUR_DIGITS: frozenset[tuple[int, str]] = frozenset(
    {(0, "red"), (1, "green"), (2, "blue"), (3, "yellow"), (4, "red")}
)
HELDOUT_DIGIT_PAIRS: frozenset[frozenset[int]] = frozenset({frozenset({0, 3}), frozenset({1, 4})})
HELDOUT_COUNTS: frozenset[tuple[int, int]] = frozenset({(2, 1), (3, 4)})  # (count, digit)


@dataclass(frozen=True)
class ObjectSpec:
    """A required object: ``digit``, ``colour`` (None: free) and ``count`` (exact for counting)."""

    digit: int
    colour: str | None = None
    count: int = 1


@dataclass(frozen=True)
class PromptSpec:
    """A parsed prompt. ``relation`` (position prompts) reads ``objects[0] <relation> objects[1]``."""

    text: str
    category: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    @property
    def num_objects(self) -> int:
        """How many objects the canvas must hold (exactly)."""
        return sum(o.count for o in self.objects)

    @property
    def digits(self) -> tuple[int, ...]:
        return tuple(o.digit for o in self.objects)

    @property
    def colour_free(self) -> bool:
        return all(o.colour is None for o in self.objects)

    @property
    def position_free(self) -> bool:
        return self.relation is None


# =========================================================================== prompts
def _single(d: int) -> str:
    return f"a {d}"


def _two(a: int, b: int) -> str:
    return f"a {a} and a {b}"


def _counting(n: int, d: int) -> str:
    return f"{COUNT_WORDS[n]} {d}s"


def _colors(c: str, d: int) -> str:
    return f"a {c} {d}"


def _position(a: int, relation: str, b: int) -> str:
    return f"a {a} {_RELATION_TEXT[relation]} a {b}"


def _color_attr(c1: str, a: int, c2: str, b: int) -> str:
    return f"a {c1} {a} and a {c2} {b}"


_D = r"([0-4])"
_C = "(" + "|".join(COLOURS) + ")"
_PATTERNS = [
    ("single_object", re.compile(rf"^a {_D}$")),
    ("two_object", re.compile(rf"^a {_D} and a {_D}$")),
    ("counting", re.compile(rf"^(two|three|four) {_D}s$")),
    ("colors", re.compile(rf"^a {_C} {_D}$")),
    ("position", re.compile(rf"^a {_D} (to the left of|to the right of|above|below) a {_D}$")),
    ("color_attr", re.compile(rf"^a {_C} {_D} and a {_C} {_D}$")),
]


@lru_cache(maxsize=4096)
def parse_prompt(prompt: str) -> PromptSpec:
    """Parse a grammar prompt into a ``PromptSpec``; ``ValueError`` naming the accepted forms otherwise.

    Whitespace is normalised and case ignored. Two-object prompts need distinct digits, color_attr
    prompts distinct colours too.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string; got {type(prompt).__name__}")
    text = " ".join(prompt.lower().split())
    for category, pattern in _PATTERNS:
        m = pattern.match(text)
        if not m:
            continue
        g = m.groups()
        if category == "single_object":
            spec = PromptSpec(text, category, (ObjectSpec(int(g[0])),))
        elif category == "two_object":
            spec = PromptSpec(text, category, (ObjectSpec(int(g[0])), ObjectSpec(int(g[1]))))
        elif category == "counting":
            spec = PromptSpec(text, category, (ObjectSpec(int(g[1]), None, _WORD_COUNTS[g[0]]),))
        elif category == "colors":
            spec = PromptSpec(text, category, (ObjectSpec(int(g[1]), g[0]),))
        elif category == "position":
            relation = {v: k for k, v in _RELATION_TEXT.items()}[g[1]]
            spec = PromptSpec(text, category, (ObjectSpec(int(g[0])), ObjectSpec(int(g[2]))), relation)
        else:
            if g[0] == g[2]:
                raise ValueError(f"prompt {prompt!r}: a color_attr prompt needs two different colours")
            spec = PromptSpec(text, category, (ObjectSpec(int(g[1]), g[0]), ObjectSpec(int(g[3]), g[2])))
        if len(spec.objects) == 2 and spec.objects[0].digit == spec.objects[1].digit:
            raise ValueError(f"prompt {prompt!r}: two-object prompts need two different digits")
        return spec
    raise ValueError(
        f"prompt {prompt!r} is not in the compose grammar; accepted forms (digits 0-4, colours "
        f"{', '.join(COLOURS)}): 'a 3', 'a 3 and a 1', 'three 2s' (two..four), 'a green 2', "
        "'a 2 to the left of a 4' (to the right of / above / below), 'a red 1 and a yellow 4'"
    )


@lru_cache(maxsize=1)
def all_prompts() -> tuple[str, ...]:
    """Every grammar prompt, in the documented order (category, then construction order)."""
    out: list[str] = [_single(d) for d in DIGITS]
    out += [_two(a, b) for a, b in permutations(DIGITS, 2)]
    out += [_counting(n, d) for d in DIGITS for n in COUNT_WORDS]
    out += [_colors(c, d) for d in DIGITS for c in COLOURS]
    out += [_position(a, r, b) for a, b in permutations(DIGITS, 2) for r in RELATIONS]
    out += [_color_attr(c1, a, c2, b) for a, b in permutations(DIGITS, 2) for c1, c2 in permutations(COLOURS, 2)]
    return tuple(out)


def is_heldout_prompt(prompt: str | PromptSpec) -> bool:
    """Whether a prompt names a held-out colour-digit pair, digit pair or count (module docstring)."""
    spec = prompt if isinstance(prompt, PromptSpec) else parse_prompt(prompt)
    if any((o.digit, o.colour) in HELDOUT_COLOUR_DIGITS for o in spec.objects if o.colour is not None):
        return True
    if len(spec.objects) == 2 and frozenset(spec.digits) in HELDOUT_DIGIT_PAIRS:
        return True
    if spec.category == "counting" and (spec.objects[0].count, spec.objects[0].digit) in HELDOUT_COUNTS:
        return True
    return False


@lru_cache(maxsize=1)
def _prompt_sets() -> dict[str, tuple[str, ...]]:
    everything = all_prompts()
    return {
        "train": tuple(p for p in everything if not is_heldout_prompt(p)),
        "heldout": tuple(p for p in everything if is_heldout_prompt(p)),
        "all": everything,
    }


def prompt_sets() -> dict[str, list[str]]:
    """``{"train", "heldout", "all"}``: disjoint train / held-out lists and their union (ordered)."""
    return {k: list(v) for k, v in _prompt_sets().items()}


def balanced_prompts(prompts: Sequence[str], per_category: int, seed: int = 0) -> list[str]:
    """``per_category`` prompts of each category present in ``prompts`` (cycling a seeded
    permutation of that category's prompts), categories in ``CATEGORIES`` order."""
    rng = np.random.default_rng(seed)
    by_category: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    for p in prompts:
        by_category[parse_prompt(p).category].append(p)
    out: list[str] = []
    for category in CATEGORIES:
        pool = by_category[category]
        if not pool:
            continue
        order = [pool[i] for i in rng.permutation(len(pool))]
        out += [order[i % len(order)] for i in range(per_category)]
    return out


# =========================================================================== conditions
def relation_holds(a_cell: int, relation: str, b_cell: int) -> bool:
    """Grid relation between two cells (module docstring)."""
    if relation == "left of":
        return cell_col(a_cell) < cell_col(b_cell)
    if relation == "right of":
        return cell_col(a_cell) > cell_col(b_cell)
    if relation == "above":
        return cell_row(a_cell) < cell_row(b_cell)
    if relation == "below":
        return cell_row(a_cell) > cell_row(b_cell)
    raise ValueError(f"unknown relation {relation!r}; accepted: {RELATIONS}")


def condition_names(spec: PromptSpec | str) -> list[str]:
    """Names of the prompt's conditions, in the order ``check_conditions`` returns them."""
    spec = spec if isinstance(spec, PromptSpec) else parse_prompt(spec)
    names: list[str] = []
    if spec.category == "counting":
        o = spec.objects[0]
        names.append(f"exactly {o.count} x {o.digit}")
    else:
        names += [f"has {o.digit}" for o in spec.objects]
        names += [f"{o.digit} is {o.colour}" for o in spec.objects if o.colour is not None]
        if spec.relation is not None:
            names.append(f"{spec.objects[0].digit} {spec.relation} {spec.objects[1].digit}")
    names.append(f"exactly {spec.num_objects} object{'s' if spec.num_objects > 1 else ''}")
    return names


def check_conditions(spec: PromptSpec | str, objects: Sequence[SceneObject]) -> list[bool]:
    """Which of the prompt's conditions the objects (read from a canvas) meet (``condition_names``)."""
    spec = spec if isinstance(spec, PromptSpec) else parse_prompt(spec)
    by_digit: dict[int, list[SceneObject]] = {}
    for obj in objects:
        by_digit.setdefault(int(obj.digit), []).append(obj)
    met: list[bool] = []
    if spec.category == "counting":
        o = spec.objects[0]
        met.append(len(by_digit.get(o.digit, [])) == o.count)
    else:
        met += [o.digit in by_digit for o in spec.objects]
        met += [
            any(x.colour == o.colour for x in by_digit.get(o.digit, []))
            for o in spec.objects
            if o.colour is not None
        ]
        if spec.relation is not None:
            a, b = spec.objects
            met.append(
                any(
                    relation_holds(x.cell, spec.relation, y.cell)
                    for x in by_digit.get(a.digit, [])
                    for y in by_digit.get(b.digit, [])
                )
            )
    met.append(len(objects) == spec.num_objects)
    return met


def strict_score(spec: PromptSpec | str, objects: Sequence[SceneObject]) -> float:
    """1.0 when every condition holds, else 0.0."""
    return float(all(check_conditions(spec, objects)))


def partial_score(spec: PromptSpec | str, objects: Sequence[SceneObject]) -> float:
    """Fraction of the prompt's conditions met, in [0, 1]."""
    met = check_conditions(spec, objects)
    return sum(met) / len(met)


# =========================================================================== scenes
def _allowed_colours(digit: int, pretraining: bool) -> list[str]:
    if not pretraining:
        return list(COLOURS)
    return [c for c in COLOURS if (digit, c) not in HELDOUT_COLOUR_DIGITS]


def sample_scene(
    prompt: str | PromptSpec, rng: np.random.Generator, pretraining: bool = False
) -> list[SceneObject]:
    """A random scene satisfying the prompt: its objects exactly, in random free cells and colours.

    ``pretraining=True`` draws free colours only among those allowed for the digit (never a
    held-out colour-digit pair); it refuses held-out prompts.
    """
    spec = prompt if isinstance(prompt, PromptSpec) else parse_prompt(prompt)
    if pretraining and is_heldout_prompt(spec):
        raise ValueError(f"prompt {spec.text!r} is held out; pretraining scenes use train prompts only")
    if spec.relation is not None:
        a, b = spec.objects
        pairs = [(i, j) for i in range(NUM_CELLS) for j in range(NUM_CELLS) if i != j and relation_holds(i, spec.relation, j)]
        cells = list(pairs[rng.integers(len(pairs))])
    else:
        cells = [int(c) for c in rng.permutation(NUM_CELLS)[: spec.num_objects]]
    objects: list[SceneObject] = []
    k = 0
    for o in spec.objects:
        for _ in range(o.count):
            if o.colour is not None:
                colour = o.colour
            else:
                allowed = _allowed_colours(o.digit, pretraining)
                colour = allowed[rng.integers(len(allowed))]
            objects.append(SceneObject(o.digit, colour, cells[k]))
            k += 1
    return objects


def scene_is_heldout(objects: Sequence[SceneObject]) -> bool:
    """Whether a scene shows a held-out combination: a held-out colour-digit pair, both digits of a
    held-out digit pair, or exactly a held-out count of one digit and nothing else."""
    digits = [int(o.digit) for o in objects]
    if any((int(o.digit), o.colour) in HELDOUT_COLOUR_DIGITS for o in objects):
        return True
    if any(pair <= set(digits) for pair in HELDOUT_DIGIT_PAIRS):
        return True
    if digits and len(set(digits)) == 1 and (len(digits), digits[0]) in HELDOUT_COUNTS:
        return True
    return False
