"""dvc.yaml names real code and real params, and the pipeline has the five stages in order."""

import ast
import dataclasses
import importlib
from pathlib import Path

import jinja2
import jinja2.meta
import pytest
import yaml

from florence_ops.cli import STAGES
from florence_ops.config import Params, from_dict
from florence_ops.params_file import read_yaml
from tests.conftest import REPO

PIPELINE = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
PARAMS = read_yaml(REPO / "params.yaml")


def _resolve(text: str) -> str:
    """Expand `${paths.x}` the way DVC templating does from params.yaml."""
    while "${" in text:
        start = text.index("${")
        end = text.index("}", start)
        node = PARAMS
        for key in text[start + 2 : end].split("."):
            node = node[key]
        text = text[:start] + str(node) + text[end + 1 :]
    return text


def test_five_stages_in_order_each_calling_its_function():
    assert list(PIPELINE) == list(STAGES)
    for name, stage in PIPELINE.items():
        assert stage["cmd"] == f"florence-ops {name}"
        module = importlib.import_module(f"florence_ops.stages.{name}")
        assert callable(getattr(module, name))


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_code_deps_exist_and_include_its_module(name):
    deps = [_resolve(d) for d in PIPELINE[name].get("deps", [])]
    assert f"florence_ops/stages/{name}.py" in deps
    for dep in deps:
        if dep.startswith("florence_ops/"):
            assert (REPO / dep).is_file(), dep


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_params_are_real_keys(name):
    for key in PIPELINE[name].get("params", []):
        node = PARAMS
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{name}: params key {key} not in params.yaml"
            node = node[part]


def test_params_yaml_validates():
    assert isinstance(from_dict(Params, PARAMS), Params)


def test_lr_reruns_train_not_preprocess():
    assert "lr" in PIPELINE["train"]["params"]
    assert "lr" not in PIPELINE["download"]["params"] and "lr" not in PIPELINE["preprocess"]["params"]


def test_outputs_chain_from_stage_to_stage():
    outs = {}
    for name, stage in PIPELINE.items():
        for out in stage.get("outs", []):
            outs[_resolve(out if isinstance(out, str) else next(iter(out)))] = name
    for name, stage in PIPELINE.items():
        for dep in stage.get("deps", []):
            path = _resolve(dep)
            producer = next((s for o, s in outs.items() if path == o or Path(path).is_relative_to(o)), None)
            if producer is not None:
                assert list(STAGES).index(producer) < list(STAGES).index(name), (name, path)


# --- Each stage lists exactly the code and params it reads, derived from the code so the lists cannot drift ---

STAGE_FUNCTIONS = {name: f"florence_ops.stages.{name}:{name}" for name in STAGES}
# A read of the left key is a read of the right keys too: config loading fills it from them when it is null.
DERIVED = {"evaluate.max_new_tokens": ("train.max_answer_tokens",)}


def code_closure(module: Path) -> set[str]:
    """The florence_ops modules `module` imports, directly or through others, anywhere in their bodies (function-level
    imports included), and the templates they render; package `__init__.py` files hold no code and are left out."""
    seen, todo = set(), [module]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            for name in names:
                if name.split(".")[0] == "florence_ops" and (found := _module_file(name)) is not None:
                    todo.append(found)
    code = {str(path.relative_to(REPO)) for path in seen if path.name != "__init__.py"}
    return code | templates_read(code)


TEMPLATES = REPO / "florence_ops" / "templates"


def templates_read(files: set[str]) -> set[str]:
    """The package templates that `files` name in their string constants, and those these templates include, extend
    or import in turn (package data a stage reads is as much a dependency as its code)."""
    available = {path.name for path in TEMPLATES.iterdir()}
    names = {
        node.value
        for file in files
        for node in ast.walk(ast.parse((REPO / file).read_text()))
        if isinstance(node, ast.Constant) and node.value in available
    }
    todo = list(names)
    while todo:
        source = (TEMPLATES / todo.pop()).read_text()
        for name in jinja2.meta.find_referenced_templates(jinja2.Environment().parse(source)):
            if name not in names:
                names.add(name)
                todo.append(name)
    return {str((TEMPLATES / name).relative_to(REPO)) for name in names}


def _module_file(name: str) -> Path | None:
    path = REPO.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_package_init_files_hold_no_code():
    for init in (REPO / "florence_ops").rglob("__init__.py"):
        body = [node for node in ast.parse(init.read_text()).body if not isinstance(node, ast.Expr)]
        assert all(isinstance(node, ast.Assign) for node in body), f"{init} runs code a stage would depend on"


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_code_deps_are_exactly_its_import_closure(name):
    declared = {_resolve(d) for d in PIPELINE[name].get("deps", []) if _resolve(d).startswith("florence_ops/")}
    assert declared == code_closure(REPO / f"florence_ops/stages/{name}.py")


def test_templates_a_report_loads_are_evaluate_deps(monkeypatch, tmp_path):
    """What the derivation above finds by reading the code is what rendering really loads."""
    from florence_ops import templating
    from florence_ops.report_html import render_html_report

    loaded = []
    original = jinja2.PackageLoader.get_source

    def recording(self, environment, template):
        loaded.append(template)
        return original(self, environment, template)

    monkeypatch.setattr(jinja2.PackageLoader, "get_source", recording)
    templating._environment.cache_clear()
    try:
        render_html_report({"n_questions": 0}, None, [], lambda image_id: None)
    finally:
        templating._environment.cache_clear()
    assert loaded and {f"florence_ops/templates/{name}" for name in loaded} <= set(PIPELINE["evaluate"]["deps"])


class _Reads:
    """Wraps a Params tree so that every setting a stage reads is recorded by its dotted name."""

    def __init__(self):
        self.keys: set[str] = set()

    def wrap(self, node, prefix: str = ""):
        reads, fields = self, {f.name for f in dataclasses.fields(node)}

        class Recorded(type(node)):
            def __getattribute__(self, attr):
                value = object.__getattribute__(self, attr)
                if attr not in fields:
                    return value
                key = f"{prefix}{attr}"
                if dataclasses.is_dataclass(value):
                    return reads.wrap(value, f"{key}.")
                reads.keys.add(key)
                return value

        recorded = object.__new__(Recorded)
        recorded.__dict__.update(node.__dict__)
        return recorded


def _covers(declared: str, read: str) -> bool:
    return read == declared or read.startswith(declared + ".")


@pytest.mark.slow
def test_stage_params_are_exactly_what_each_stage_reads(tmp_path):
    """Run the five stages on the tiny params with every read recorded: each read is declared in dvc.yaml (paths are
    declared through the templated deps and outs), and each declared key is read by the stage's code."""
    from tests.conftest import tiny_params

    params = tiny_params(tmp_path, epochs=1)
    for name in STAGES:
        module, function = STAGE_FUNCTIONS[name].split(":")
        reads = _Reads()
        getattr(importlib.import_module(module), function)(reads.wrap(params))
        used = {key for key in reads.keys if not key.startswith("paths.")}
        used |= {extra for key in used for extra in DERIVED.get(key, ())}
        declared = PIPELINE[name].get("params", [])
        undeclared = sorted(key for key in used if not any(_covers(d, key) for d in declared))
        assert not undeclared, f"{name} reads params dvc.yaml does not list: {undeclared}"
        # settings read only in other configurations (a hub model, the local source) must at least be in the code
        attributes = _attributes(code_closure(REPO / f"florence_ops/stages/{name}.py"))
        unread = sorted(d for d in declared if not set(d.split(".")) <= attributes)
        assert not unread, f"{name} lists params its code never reads: {unread}"


def _attributes(files: set[str]) -> set[str]:
    """Every attribute name the code of `files` reads (`params.train.lr` gives train and lr), and the parts of the
    dotted names it passes as strings (`pick(params, ("train.prompt",))`)."""
    names = set()
    for file in (file for file in files if file.endswith(".py")):  # templates hold no settings
        for node in ast.walk(ast.parse((REPO / file).read_text())):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.update(node.value.split("."))
    return names
