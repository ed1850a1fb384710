"""The package's Jinja2 templates (`florence_ops/templates/*.html.j2`), rendered with autoescaping on."""

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
