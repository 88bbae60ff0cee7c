"""The README's and bench/RESULTS.md's figures are rendered from the committed runs, never typed."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results():
    spec = importlib.util.spec_from_file_location("results", REPO / "scripts" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def test_every_generated_block_is_what_the_committed_results_give(results):
    for document in results.DOCUMENTS:
        text = document.read_text()
        names = [m.group("name") for m in results.BLOCK.finditer(text)]
        assert names, f"{document.name} has no generated block"
        assert set(names) <= set(results.BLOCKS)
        assert results.render_text(text) == text, f"{document.name}: run python scripts/results.py render"
    assert results.main(["check"]) == 0


def test_a_figure_edited_by_hand_is_found_and_rendered_back(results):
    text = (REPO / "README.md").read_text()
    block = next(m for m in results.BLOCK.finditer(text) if m.group("name") == "replication")
    edited = text[:block.start("body")] + block.group("body").replace("0.", "0.9", 1) + text[block.end("body"):]
    assert edited != text and results.render_text(edited) == text


def test_the_readme_results_sections_hold_no_typed_figure(results):
    """Outside the generated blocks the results sections carry no measured number (a decimal or a duration)."""
    text = (REPO / "README.md").read_text()
    for heading in ("What the study shows", "Replication", "MUSE beside TOFU"):
        prose = results.BLOCK.sub("", _section(text, heading))
        typed = re.findall(r"[-+−]?\d+\.\d+|\d+ (?:h|min|s)\b|\d+\s*[–-]\s*\d+ \(", prose)
        assert not typed, f"README section {heading!r} types figures by hand: {typed}"


def test_the_readme_says_where_its_figures_were_produced(results):
    text = (REPO / "README.md").read_text()
    for name in ("demo", "replication", "muse"):
        machine = json.loads((results.RESULTS / name / "study.json").read_text())["machine"]
        assert machine["cpu_model"] in text and machine["torch"] in text
    table = json.loads((results.RESULTS / "replication" / "replication.json").read_text())
    replication = _section(text, "Replication")
    for claim in table["claims"]:
        assert f"**Claim {claim['claim']}, {claim['verdict']}.**" in replication
