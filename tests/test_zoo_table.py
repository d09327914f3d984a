"""The router zoo table: generated from the family table, printed by ``python -m minimoe zoo``,
and the site's page docs/zoo.md is that output (regenerate it: python -m minimoe zoo --write
docs/zoo.md)."""

from pathlib import Path

from minimoe.__main__ import main
from minimoe.families import FAMILIES
from minimoe.zoo_table import COLUMNS, describe, zoo_table

PAGE = Path(__file__).parents[1] / "docs" / "zoo.md"


def test_the_site_page_is_current():
    assert PAGE.read_text() == zoo_table(), "run: python -m minimoe zoo --write docs/zoo.md"


def test_the_command_prints_the_table(capsys):
    main(["zoo"])
    assert capsys.readouterr().out == zoo_table()


def test_every_family_has_a_full_row():
    table = zoo_table()
    for family in FAMILIES:
        row = describe(family)
        assert list(row) == list(COLUMNS)
        assert all(value and "None" not in value for value in row.values()), row
        assert f"| {family.name} |" in table
        assert row["converts"].startswith("yes" if family.converts else "no: ")


def test_hand_checked_rows():
    rows = {f.name: describe(f) for f in FAMILIES}
    dsv3 = rows["DeepSeek-V3"]
    assert (dsv3["score"], dsv3["selection"]) == ("sigmoid", "top-k of scores + b")
    assert dsv3["groups"] == "`n_group` groups, best `topk_group` by sum of top 2"
    assert dsv3["bias"] == "selects only (`gate.e_score_correction_bias`)"
    assert "never" in dsv3["what HF trains"]
    assert rows["Jamba"]["normalization"] == "none"
    assert rows["DBRX"]["normalization"] == "`moe_normalize_expert_weights`-norm"
    assert rows["gpt-oss"]["selection"] == "top-k of logits, softmax over the k"
    assert rows["DeepSeek-V2"]["groups"].endswith("by max")
    assert "DEFECT" in rows["NLLB-MoE"]["converts"]
    assert rows["Qwen2-MoE"]["shared expert"].startswith("sigmoid-gated")
    assert rows["Mixtral"]["training noise"] == (
        "input times U(1 ± `router_jitter_noise`): router, experts"
    )
    assert "twice" in rows["PhiMoE"]["training noise"]
    assert "float32" in rows["Switch"]["training noise"]
    assert rows["OLMoE"]["training noise"] == "none"
