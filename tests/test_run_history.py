"""Tests of florence_ops.run_history: the markdown report's comparison table (the flow tests cover the files)."""

from __future__ import annotations

from florence_ops.run_history import comparison_table


def test_comparison_table_lists_headline_and_per_type_figures():
    candidate = {"anls": 0.6, "exact_match": 0.5, "n_questions": 10, "by_type": {"table": {"anls": 0.7}}}
    champion = {"anls": 0.5, "exact_match": 0.5, "n_questions": 10, "by_type": {"form": {"anls": 0.2}}}
    table = comparison_table(candidate, champion).splitlines()
    assert table[0] == "| metric | champion | candidate | difference |"
    assert "| anls | 0.5000 | 0.6000 | +0.1000 |" in table
    assert "| levenshtein_similarity | – | – | – |" in table
    assert "| n_questions | 10 | 10 | – |" in table
    assert "| anls: table | – | 0.7000 | – |" in table and "| anls: form | 0.2000 | – | – |" in table
    assert "| anls | – | 0.6000 | – |" in comparison_table(candidate, None)
