"""What `dvc repro` output says it did with each stage, as the flow records it."""

from florence_ops.dvc_runs import stage_outcomes

# DVC 3's own lines (from a pool run: its first stages restored from the run-cache)
OUTPUT = """\
Stage 'download' is cached - skipping run, checking out outputs
Generating lock file 'dvc.lock'
Stage 'preprocess' didn't change, skipping
Running stage 'evaluate':
> florence-ops evaluate
2026-12-02 15:40:20,001 INFO florence_ops.cli: Running stage 'not a dvc line'
Updating lock file 'dvc.lock'
"""


def test_stage_outcomes_from_dvc_output():
    assert stage_outcomes(OUTPUT.splitlines(keepends=True)) == {
        "ran": ["evaluate"],
        "restored": ["download"],
        "unchanged": ["preprocess"],
    }
