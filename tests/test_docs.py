"""What the docs tell users to type, or to read as moelm's output, checked against the code."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from moelm.config import named_config
from moelm.parallel.comm import comm_plan
from moelm.train.recipe import load_recipe
from moelm.train.trainer import Trainer

ROOT = Path(__file__).parent.parent
UNITS = {"B": 1, "KB": 1e3, "MB": 1e6}


def comm_rows():
    """docs/parallel.md's "Communication per token" table: (model, tp, ep, decode cell, prefill cell)."""
    text = (ROOT / "docs/parallel.md").read_text()
    table = text[text.index("| model | layout | decode, per token |"):].split("\n\n")[0]
    rows = []
    for line in table.splitlines()[2:]:
        model, layout, decode, prefill = [c.strip() for c in line.strip("|").split("|")]
        tp, ep = (int(m.group(1)) if m else 1 for m in (re.search(r"tp (\d+)", layout), re.search(r"ep (\d+)", layout)))
        rows.append((model, tp, ep, decode, prefill))
    return rows


@pytest.mark.parametrize("model, tp, ep, decode, prefill", comm_rows())
def test_parallel_comm_table_is_comm_plan(model, tp, ep, decode, prefill):
    """Each figure is moelm info's (comm_plan's) payload per token, rounded to the digits shown."""
    config = named_config({"21B-A3B": "ernie-4.5-21b-a3b", "300B-A47B": "ernie-4.5-300b-a47b"}[model])
    tokens = 4096
    for cell, plan, n in ((decode, comm_plan(config, tp, ep, tokens=1, logits=1), 1),
                          (prefill, comm_plan(config, tp, ep, tokens=tokens, logits=1), tokens)):
        if cell.startswith("same as"):
            continue
        shown = {kind: (value, unit) for kind, value, unit in re.findall(r"(\w+) ([\d.]+) (\w+)", cell)}
        assert set(shown) == set(plan), (cell, plan)
        for kind, (value, unit) in shown.items():
            step = 10.0 ** -len(value.partition(".")[2])  # the last digit shown
            assert abs(plan[kind] / n / UNITS[unit] - float(value)) <= step / 2, (kind, cell, plan[kind] / n)


def torchrun_recipes():
    """The recipes the docs (and the recipes' own headers) run under torchrun."""
    found = set()
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "recipes").glob("*.yaml")]:
        found |= set(re.findall(r"torchrun [^\n]*-m moelm finetune (\S+\.yaml)", path.read_text()))
    return sorted(found)


@pytest.mark.parametrize("recipe", torchrun_recipes())
def test_torchrun_recipes_train_no_mtp_head(recipe, tmp_path, monkeypatch):
    """Training ERNIE's MTP head across processes is refused; a recipe the docs run under torchrun (on the demo
    model, which has the head) must leave it as loaded, or that command stops at its first line."""
    monkeypatch.chdir(ROOT)
    loaded = load_recipe(recipe, [f"--checkpoint.dir={tmp_path}"])
    if not Path(loaded.model.name_or_path).is_dir():
        pytest.skip(f"{loaded.model.name_or_path} is not here")
    assert Trainer(loaded, progress=False).mtp_coef == 0
