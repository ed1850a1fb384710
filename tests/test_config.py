import dataclasses
import json

import pytest

from florence_ops.config import Params, TinyModel, TrainConfig, from_dict, load_params, to_dict
from florence_ops.errors import ConfigError
from florence_ops.params_file import parse_value, read_yaml
from tests.conftest import REPO


def test_repository_params_load_and_cover_every_field():
    params = load_params(REPO / "params.yaml")
    raw = read_yaml(REPO / "params.yaml")

    assert set(raw) == {f.name for f in dataclasses.fields(Params)}
    for section in ("paths", "data", "model", "train", "evaluate", "promotion", "schedule"):
        node = getattr(params, section)
        assert set(raw[section]) == {f.name for f in dataclasses.fields(node)}, section


def _leaves(node: dict, prefix: str = "") -> dict:
    """Each setting of a nested mapping by its dotted key (lists are settings, not sections)."""
    leaves = {}
    for key, value in node.items():
        leaves.update(_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return leaves


def test_class_defaults_are_params_yaml():
    """One source of defaults: `Params()` (what serve uses beside a bare model directory) holds params.yaml's values."""
    defaults = _leaves(to_dict(Params()))
    assert set(defaults) == set(_leaves(read_yaml(REPO / "params.yaml"))), "params.yaml must set every key"
    documented = _leaves(to_dict(load_params(REPO / "params.yaml")))
    differ = [f"{key}: {defaults[key]!r} in config.py, {documented[key]!r} in params.yaml"
              for key in defaults if defaults[key] != documented[key]]  # fmt: skip
    assert not differ, "; ".join(differ)


def test_dvc_written_float_is_read_as_float(tmp_path):
    # `dvc exp run -S lr=1e-6` writes exactly this line; YAML 1.1 (PyYAML safe_load) would return the string '1e-06'.
    text = (REPO / "params.yaml").read_text()
    lines = [("lr: 1e-06" if line.startswith("lr:") else line) for line in text.splitlines()]
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(lines))
    params = load_params(path)
    assert isinstance(params.lr, float) and params.lr == 1e-6
    assert read_yaml(path)["lr"] == 1e-6


def test_params_written_by_dvc_set_param_read_as_float(tmp_path):
    """DVC's own writer, as `dvc exp run -S lr=1e-6` calls it, then our reader: the float survives the round trip."""
    from dvc.utils.hydra import apply_overrides as dvc_set_params

    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    dvc_set_params(path, ["lr=1e-6"])
    assert "\nlr: 1e-06 " in path.read_text()
    params = load_params(path)
    assert type(params.lr) is float and params.lr == 1e-06
    assert load_params(path, {"lr": parse_value("1e-6")}).lr == 1e-06


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-6", 1e-06), ("1e-06", 1e-06), (".5", 0.5), ("null", None), ("[]", []), ("12", 12), ("yes", "yes")],
)
def test_set_values_parse_as_yaml12(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_invalid_set_value_is_one_line():
    with pytest.raises(ConfigError, match=r"^'\[1,': invalid YAML at line 1, column 4: .*opened at line 1\)$"):
        parse_value("[1,")


def test_yaml_is_read_as_plain_data(tmp_path):
    """The stages compare, hash and json.dumps what read_yaml returns: plain dicts and lists, not parser types."""
    raw = read_yaml(REPO / "params.yaml")
    assert type(raw) is dict and type(raw["train"]) is dict and type(raw["train"]["freeze"]) is list
    assert json.loads(json.dumps(raw)) == raw


@pytest.mark.parametrize("text", ["1e-06", "1.5e3", "-2E-4", "3.0", ".5"])
def test_yaml12_floats(tmp_path, text):
    path = tmp_path / "x.yaml"
    path.write_text(f"v: {text}\n")
    assert read_yaml(path)["v"] == float(text)


def test_ints_and_strings_keep_their_type(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("a: 12\nb: abc\nc: 1_000\nd: '1e-06'\n")
    assert read_yaml(path) == {"a": 12, "b": "abc", "c": 1000, "d": "1e-06"}


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"train\.grad_acum_steps: unknown key"):
        from_dict(Params, {"train": {"grad_acum_steps": 2}})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"epochs": "ten"}, r"epochs: expected int"),
        ({"lr": "fast"}, r"lr: expected float"),
        ({"train": {"freeze": "vision_tower"}}, r"train\.freeze: expected a list"),
        ({"train": {"schedule": "exp"}}, r"train\.schedule: expected one of"),
        ({"data": {"source": "ftp"}}, r"data\.source: expected one of"),
        ({"train": {"freeze": ["decoder"]}}, r"train\.freeze: unknown part"),
        ({"model": {"tiny": {"vision_dims": [32, "x"]}}}, r"model\.tiny\.vision_dims\[1\]: expected int"),
        ({"train": {"vision_cache": "yes"}}, r"train\.vision_cache: expected bool"),
        ({"epochs": "12"}, r"^epochs: expected int, got '12'$"),
        ({"seed": True}, r"^seed: expected int, got True$"),
        ({"data": {"hf": None}}, r"^data\.hf: expected a mapping, got None$"),
    ],
)
def test_wrong_types_are_named(data, message):
    with pytest.raises(ConfigError, match=message) as error:
        from_dict(Params, data)
    assert "\n" not in str(error.value)


def test_sections_built_in_code_are_validated_too():
    with pytest.raises(ConfigError, match=r"^image_size: expected int, got 'x'$"):
        TinyModel(image_size="x")
    known = r"\(known: checkpoint_every, collective_timeout_s, "
    with pytest.raises(ConfigError, match=r"^grad_acum_steps: unknown key " + known):
        TrainConfig(grad_acum_steps=2)


def test_int_accepted_where_float_expected():
    assert from_dict(Params, {"lr": 1}).lr == 1.0


def test_batch_must_split_over_processes_and_accumulation():
    with pytest.raises(ConfigError, match="divisible"):
        from_dict(Params, {"batch_size": 10, "train": {"grad_accum_steps": 4}})


def test_overrides_use_dotted_keys():
    params = load_params(REPO / "params.yaml", {"lr": 0.5, "train.schedule": "linear"})
    assert params.lr == 0.5 and params.train.schedule == "linear"


def test_decoding_budget_covers_what_training_teaches():
    """One answer-token budget: evaluation, validation and the exported generation config can emit every answer
    training teaches (labels are cut at train.max_answer_tokens, <s> and </s> included)."""
    params = load_params(REPO / "params.yaml")
    assert params.evaluate.max_new_tokens >= params.train.max_answer_tokens
    assert load_params(REPO / "params.yaml", {"evaluate.max_new_tokens": None}).evaluate.max_new_tokens == 32
    assert load_params(REPO / "params.yaml", {"train.max_answer_tokens": 48}).evaluate.max_new_tokens == 48


def test_decoding_budget_below_training_is_refused():
    with pytest.raises(ConfigError, match=r"evaluate\.max_new_tokens \(20\) is below train\.max_answer_tokens \(32\)"):
        load_params(REPO / "params.yaml", {"evaluate.max_new_tokens": 20})


def test_streaming_refuses_length_grouping_it_would_not_do():
    settings = {"train.streaming": True, "train.vision_cache": False, "train.length_grouping": 50}
    with pytest.raises(ConfigError, match=r"^train\.length_grouping: streaming .*; set it to 1 with train\.streaming$"):
        load_params(REPO / "params.yaml", settings)
    assert load_params(REPO / "params.yaml", {**settings, "train.length_grouping": 1}).train.streaming


@pytest.mark.parametrize("setting", [{"train.distributed": "fsdp"}, {"train.gradient_checkpointing": True}])
def test_bf16_pure_is_refused_where_its_bf16_weights_would_not_be_seen(setting):
    with pytest.raises(ConfigError, match=r"^train\.precision: bf16-pure .*; use bf16 \(autocast\) with them$"):
        load_params(REPO / "params.yaml", {"train.precision": "bf16-pure", **setting})


def test_lora_needs_a_frozen_vision_tower():
    with pytest.raises(ConfigError, match=r"train\.lora\.enabled"):
        load_params(REPO / "params.yaml", {"train.lora.enabled": True, "train.freeze": []})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"params\.yaml: no such file$"),
        (b"lr: 0.1\n  epochs: 3\n", r"params\.yaml: invalid YAML at line 2, column 9: mapping values are not allowed"),
        (b'seed: "12\n', r"invalid YAML at line 2, column 1: .* \(while scanning a quoted scalar opened at line 1\)"),
        (b"seed: \xff\n", r"params\.yaml: not UTF-8 text \(invalid start byte at byte 6\); save it as UTF-8$"),
    ],
)
def test_unreadable_params_file_is_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "params.yaml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as error:
        load_params(path)
    assert "\n" not in str(error.value) and str(error.value).startswith(str(path))
