"""What a model directory says about asking it: settings written by export, params.yaml for other dirs, its input
size, and the version that changes when promotion swaps in a new model."""

from __future__ import annotations

import json
import shutil

from florence_ops.artifacts import SETTINGS_FILE
from florence_ops.data.processed import model_input_size
from florence_ops.promotion import promote
from florence_ops.serving.model_dir import model_metrics, read_settings, version_of
from florence_ops.serving.server import model_size
from tests.conftest import tiny_params


def test_exported_dir_describes_itself_and_other_dirs_use_params(served, tmp_path):
    export = served / "models/export"
    overrides = {"train.prompt": "<Other>", "evaluate.num_beams": 3, "evaluate.max_new_tokens": 9,
                 "train.precision": "fp32"}  # fmt: skip
    params = tiny_params(tmp_path, **overrides)
    saved = read_settings(export, params)
    assert (saved.prompt, saved.max_question_tokens, saved.num_beams, saved.max_new_tokens) == ("<DocVQA>", 64, 1, 8)
    assert saved.precision == "auto" and saved.source == SETTINGS_FILE  # the precision it was trained with
    bare = tmp_path / "bare"
    shutil.copytree(export, bare)
    (bare / SETTINGS_FILE).unlink()
    fallback = read_settings(bare, params)
    assert (fallback.prompt, fallback.num_beams, fallback.max_new_tokens, fallback.precision, fallback.source) == (
        "<Other>", 3, 9, "fp32", "params.yaml")  # fmt: skip


def test_server_resizes_pages_to_the_size_preprocess_uses(served):
    export = served / "models/export"
    assert model_size(export, tiny_params(served)) == model_input_size(export) == (256, 256)


def test_version_changes_with_each_promotion_and_metrics_follow_the_champion(served, tmp_path):
    champion = tmp_path / "champion"
    assert version_of(champion) is None
    promote(served / "models/export", champion, {"metrics": {"anls": 0.1}}, tmp_path / "champion.json")
    first = version_of(champion)
    assert first == version_of(champion)
    promote(served / "models/export", champion, {"metrics": {"anls": 0.2}}, tmp_path / "champion.json")
    assert version_of(champion) not in (None, first)
    assert model_metrics(champion)[0]["anls"] == 0.2 and model_metrics(champion)[1] == "champion.json"
    assert json.loads((champion / SETTINGS_FILE).read_text())["prompt"] == "<DocVQA>"


def test_serving_a_folder_without_a_model_is_a_one_line_error(tmp_path, capsys):
    from florence_ops.cli import main

    code = main(["serve", "--params", str(tmp_path / "absent.yaml"), "--model", str(tmp_path / "nothing")])
    assert code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {tmp_path / 'nothing'} holds no model (no config.json): run the pipeline (`dvc repro`) or pass --model"
    )
