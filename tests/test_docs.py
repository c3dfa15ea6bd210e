"""docs/guide.md cannot drift from the code: its speed-up table is regenerated and compared."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_table_script():
    spec = importlib.util.spec_from_file_location("make_speedup_table", REPO / "docs" / "make_speedup_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_guide_speedup_table_is_the_generated_one():
    script = load_table_script()
    table = script.speedup_table()
    assert script.guide_table((REPO / "docs" / "guide.md").read_text()) == table, (
        "docs/guide.md is out of date: run `python docs/make_speedup_table.py --write`"
    )
    # the FLOPs model reproduces the paper's Table 1 in the rows the guide shows
    assert "| 1.81 | 3, 1.77" in table and "6, 1.72" in table
    assert "| 14.98 |" in table and "11, 14.34" in table


def test_write_updates_only_the_table(tmp_path, monkeypatch):
    script = load_table_script()
    guide = tmp_path / "guide.md"
    guide.write_text(f"intro\n{script.BEGIN}\n| stale |\n{script.END}\noutro\n")
    monkeypatch.setattr(script, "GUIDE", guide)
    assert script.main(["--write"]) == 0
    assert guide.read_text() == f"intro\n{script.BEGIN}\n{script.speedup_table()}\n{script.END}\noutro\n"
