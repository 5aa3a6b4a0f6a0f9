"""Everything a user is pointed to is in the repository: ``docs/maths.md`` and the links into it.

Code, configs and tests cite the maths as ``docs/maths.md#<anchor>``; every such anchor must be a
heading of ``docs/maths.md`` (GitHub's anchor rules), and no file may cite a document that is not
shipped (the maths page replaced such a citation of a file that was never committed).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MATHS = ROOT / "docs" / "maths.md"
#: the sections other files rely on; renaming one breaks their links
STABLE_ANCHORS = {
    "conventions", "schedules", "sde-kernels", "flow-sde", "cps", "dance-sde", "ode",
    "log-probabilities-and-kl", "gaussian-log-prob", "exact-kl-between-two-step-policies",
    "flow-grpos-kl-convention", "losses", "ppo-clip", "flow-grpo", "flow-cps", "flow-dppo", "grpo-guard",
    "per-step-weighting", "awm", "diffusionnft", "drpo-example", "advantages", "group-relative",
    "per-prompt-statistics", "gdpo", "published-recipes", "headline-results",
}
#: folders that are not the project's own text (environments, run outputs, build metadata)
SKIPPED_DIRS = {".git", ".venv", "venv", "node_modules", "outputs", "multirun", "__pycache__", "build", "dist"}
SUFFIXES = (".py", ".yaml", ".yml", ".md")
CITATION = re.compile(r"docs/maths\.md#([A-Za-z0-9_\-]+)")
MISSING_DOC = "REFERENCE" + ".md"  # split so that this file does not cite it


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: str) -> list[str]:
    out, in_code = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (match := re.match(r"#{1,6} (.+)", line)):
            out.append(github_anchor(match.group(1)))
    return out


def project_files() -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        files += [Path(folder) / n for n in names if n.endswith(SUFFIXES)]
    return files


def test_maths_page_has_the_stable_sections_once_each():
    found = anchors(MATHS.read_text(encoding="utf-8"))
    assert sorted(STABLE_ANCHORS - set(found)) == []
    duplicates = sorted({a for a in found if found.count(a) > 1})
    assert duplicates == [], f"duplicate headings get numbered anchors on GitHub: {duplicates}"


def test_every_cited_anchor_is_a_heading_of_the_maths_page():
    headings = set(anchors(MATHS.read_text(encoding="utf-8")))
    cited: dict[str, list[str]] = {}
    for path in project_files():
        for anchor in CITATION.findall(path.read_text(encoding="utf-8", errors="replace")):
            cited.setdefault(anchor, []).append(str(path.relative_to(ROOT)))
    assert cited, "nothing cites docs/maths.md: the scan found no files"
    broken = {anchor: files for anchor, files in cited.items() if anchor not in headings}
    assert broken == {}, f"anchors cited but not headings of docs/maths.md: {broken}"


def test_in_page_links_resolve():
    text = MATHS.read_text(encoding="utf-8")
    headings = set(anchors(text))
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert links and sorted(set(links) - headings) == []


def test_no_file_cites_a_document_that_is_not_in_the_repository():
    assert not (ROOT / MISSING_DOC).exists()
    citing = [str(p.relative_to(ROOT)) for p in project_files() if MISSING_DOC in p.read_text(encoding="utf-8", errors="replace")]
    assert citing == [], f"these files cite {MISSING_DOC}, which is not in the repository: {citing}"


def test_pretraining_times_in_the_readme_are_the_shipped_records():
    """The README's pretraining wall times are those the shipped runs recorded (assets/*_pretrain.json)."""
    import json
    import re

    readme = (ROOT / "README.md").read_text()
    digits = json.loads((ROOT / "flowgym/assets/digits_pretrain.json").read_text())["seconds"]
    match = re.search(r"The shipped run: (\d+) s on 2 CPU cores \((\d+) s flow model, (\d+) s classifier", readme)
    assert match, "the README's digits pretraining sentence changed; keep its time tied to digits_pretrain.json"
    assert [int(g) for g in match.groups()] == [round(digits["total"]), round(digits["flow"]), round(digits["classifier"])]
    compose = json.loads((ROOT / "flowgym/assets/compose_pretrain.json").read_text())["seconds"]
    minutes = re.search(r"retrains the shipped model: (\d+) min", readme)
    assert minutes and int(minutes.group(1)) == round(compose["total"] / 60)
