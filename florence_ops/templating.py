"""The package's Jinja2 templates (`florence_ops/templates/`): HTML rendered with autoescaping on, and the sources of
the others (the model card, which `huggingface_hub.ModelCard` renders)."""

from __future__ import annotations

from functools import cache
from typing import Any

import jinja2


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("florence_ops", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a misspelt name fails the render instead of printing nothing
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(name: str, **context: Any) -> str:
    """The template `name` rendered with `context`; every value is HTML-escaped unless marked safe."""
    return _environment().get_template(name).render(**context)


def template_source(name: str) -> str:
    """The text of the template `name`, for a library that renders it itself."""
    environment = _environment()
    return environment.loader.get_source(environment, name)[0]
