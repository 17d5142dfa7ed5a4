"""Render the Helm chart's templates without a Helm binary, for the manifest tests.

``helm template`` is used when a ``helm`` binary is on PATH. Otherwise this renderer handles
exactly the subset of Go templates the chart uses, with Helm's semantics, and raises
``Unsupported`` on anything else, so the chart cannot drift beyond what is tested:

- actions ``{{ ... }}`` with whitespace trimming ``{{-`` / ``-}}`` and comments ``{{/* */}}``;
- ``if PIPELINE`` / ``else`` / ``end`` (nestable; empty strings, lists, maps, 0, false and
  missing values are false, as in Go);
- pipelines that start with a field path (``.Values.a.b``, ``.Release.Name``,
  ``.Release.Namespace``, ``.Chart.Name``, ``.Chart.Version``, ``.Chart.AppVersion``; a
  missing key renders as empty, Helm's ``missingkey=zero``) followed by the functions
  ``quote``, ``toJson``, ``toYaml``, ``nindent N`` and ``default PATH_OR_LITERAL``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


class Unsupported(Exception):
    """The template uses a construct this renderer does not implement."""


def render_chart(
    chart: Path, values: dict[str, Any] | None = None, release: str = "release"
) -> list[dict[str, Any]]:
    """Return the chart's rendered resources, with ``values`` merged over values.yaml."""
    if shutil.which("helm"):
        return _helm_template(chart, values or {}, release)
    merged = _merge(yaml.safe_load((chart / "values.yaml").read_text()) or {}, values or {})
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    context = {
        "Values": merged,
        "Release": {"Name": release, "Namespace": "default", "Service": "Helm"},
        "Chart": {
            "Name": meta["name"],
            "Version": meta["version"],
            "AppVersion": meta.get("appVersion", ""),
        },
    }
    documents: list[dict[str, Any]] = []
    for template in sorted((chart / "templates").glob("*.yaml")):
        text = render(template.read_text(), context)
        documents += [doc for doc in yaml.safe_load_all(text) if doc]
    return documents


def _helm_template(chart: Path, values: dict[str, Any], release: str) -> list[dict[str, Any]]:
    args = ["helm", "template", release, str(chart)]
    for key, value in _flatten(values):
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    output = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


def _flatten(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in values.items():
        if isinstance(value, dict):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def render(text: str, context: dict[str, Any]) -> str:
    """Render one template ``text`` against ``context`` (``Values``, ``Release``, ``Chart``)."""
    out: list[str] = []
    stack: list[tuple[bool, bool]] = []  # (enclosing block active, this branch taken)
    active = True
    position = 0
    trim_next = False
    for match in _ACTION.finditer(text):
        literal = text[position : match.start()]
        if trim_next:
            literal = literal.lstrip()
        if match.group(1):
            literal = literal.rstrip()
        if active:
            out.append(literal)
        position, trim_next = match.end(), bool(match.group(3))
        action = match.group(2)
        if action.startswith("/*"):
            continue
        if action.startswith("if "):
            taken = active and _truthy(_pipeline(action[3:], context))
            stack.append((active, taken))
            active = taken
        elif action == "else":
            enclosing, taken = stack[-1]
            active = enclosing and not taken
        elif action == "end":
            active = stack.pop()[0]
        elif active:
            out.append(_text(_pipeline(action, context)))
    if stack:
        raise Unsupported("an if block is not closed with end")
    literal = text[position:]
    out.append(literal.lstrip() if trim_next else literal)
    return "".join(out)


def _pipeline(expression: str, context: dict[str, Any]) -> Any:
    stages = [stage.strip() for stage in expression.split("|")]
    value = _operand(stages[0], context)
    for stage in stages[1:]:
        name, _, argument = stage.partition(" ")
        if name == "quote":
            value = json.dumps(_text(value))
        elif name == "toJson":
            value = json.dumps(value, separators=(",", ":"))
        elif name == "toYaml":
            value = yaml.safe_dump(value, default_flow_style=False, sort_keys=True).rstrip("\n")
        elif name == "nindent":
            pad = " " * int(argument)
            value = "\n" + "\n".join(pad + line for line in _text(value).splitlines())
        elif name == "default":
            value = value if _truthy(value) else _operand(argument.strip(), context)
        else:
            raise Unsupported(f"template function {name!r}")
    return value


def _operand(token: str, context: dict[str, Any]) -> Any:
    if token.startswith("."):
        value: Any = context
        for key in token[1:].split("."):
            value = value.get(key) if isinstance(value, dict) else None
        return value
    if re.fullmatch(r'"[^"]*"|-?\d+', token):
        return json.loads(token)
    raise Unsupported(f"template operand {token!r}")


def _truthy(value: Any) -> bool:
    return bool(value)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
