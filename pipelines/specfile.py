"""Reading a pipeline file: YAML, ``--set key.path=value`` overrides, and readable validation errors.

:func:`load_spec` reads a file, applies overrides and turns validation errors into one
:class:`~pipelines.errors.SpecError` whose message names the file, the field, what was expected
and what was found.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipelines.errors import SpecError
from pipelines.secrets import MASK, is_secret, redact
from pipelines.spec import STAGE_KINDS, PipelineSpec

__all__ = ["load_spec", "apply_overrides", "format_validation_error"]


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _stage_by_key(stages: list[Any], key: str) -> dict[str, Any] | None:
    """The stage a ``--set`` key names: by name (names default to kinds), else by kind if only one."""
    dicts = [s for s in stages if isinstance(s, dict)]
    by_name = [s for s in dicts if s.get("name", s.get("kind")) == key]
    if by_name:
        return by_name[0]
    by_kind = [s for s in dicts if s.get("kind") == key]
    return by_kind[0] if len(by_kind) == 1 else None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to a raw spec dict (a new dict is returned).

    The first key may name a stage by its name (``neumann.epochs=3``), by its kind when only one
    stage has it (``train.epochs=3``), or by index (``stages.2.epochs=3``). Values are parsed as
    YAML (``3`` is an int, ``[a, b]`` a list).
    """
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. train.epochs=3")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise SpecError(f"--set {item!r}: the key is empty")
        node: Any = out
        stage = _stage_by_key(out.get("stages", []) or [], parts[0]) if parts[0] not in out else None
        if stage is not None:
            node, parts = stage, parts[1:]
        elif parts[0] in STAGE_KINDS and parts[0] not in out:
            kinds = [s.get("name", s.get("kind")) for s in out.get("stages", []) if isinstance(s, dict)]
            raise SpecError(
                f"--set {item!r}: no single stage named or of kind {parts[0]!r}; stages are {kinds}. "
                "Name the stage, e.g. --set neumann.epochs=3"
            )
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise SpecError(f"--set {item!r}: '{part}' is not an index of a list of {len(node)}")
                if last:
                    node[int(part)] = _parse_value(value)
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = _parse_value(value)
                else:
                    node = node.setdefault(part, {})
            else:
                raise SpecError(f"--set {item!r}: cannot descend into '{part}' of a {type(node).__name__}")
    return out


def _loc(loc: tuple[Any, ...], raw: dict[str, Any]) -> str:
    """A readable field path: ``stages[2] (train).epochs``."""
    out: list[str] = []
    node: Any = raw
    for part in loc:
        if isinstance(part, int):
            item = node[part] if isinstance(node, list) and part < len(node) else None
            label = None
            if isinstance(item, dict):
                kind, name = item.get("kind"), item.get("name")
                label = kind if not name or name == kind else f"{kind} {name!r}"
            out[-1] = f"{out[-1]}[{part}]" + (f" ({label})" if label else "")
            node = item
        elif part in STAGE_KINDS and out and out[-1].startswith("stages["):
            continue  # pydantic's discriminator tag; the kind is already shown
        else:
            out.append(str(part))
            node = node.get(part) if isinstance(node, dict) else None
    return ".".join(out) or "(top level)"


def format_validation_error(err: ValidationError, raw: dict[str, Any], source: str) -> str:
    """One readable message per problem: file, field, what was expected, what was found."""
    n = err.error_count()
    lines = [f"{source}: invalid pipeline spec ({n} problem{'s' if n > 1 else ''})"]
    for e in err.errors():
        where = _loc(tuple(e["loc"]), raw)
        kind = e["type"]
        if kind == "extra_forbidden":
            msg = f"unknown field '{e['loc'][-1]}' (check the spelling; unknown fields are not allowed)"
        elif kind == "missing":
            msg = "is required but missing"
        elif kind == "union_tag_invalid":
            msg = (
                f"unknown stage kind {e['input'].get('kind')!r}; expected one of {list(STAGE_KINDS)}"
                if isinstance(e["input"], dict)
                else e["msg"]
            )
        else:
            found = MASK if any(is_secret(part) for part in e["loc"]) else redact(e.get("input"))
            msg = f"{e['msg'].removeprefix('Value error, ')}" + (
                "" if kind.startswith("value_error") else f" (found {found!r})"
            )
        lines.append(f"  - {where}: {msg}")
    return "\n".join(lines)


def load_spec(path: str | Path, overrides: list[str] | None = None) -> PipelineSpec:
    """Read, override and validate a pipeline file; every problem becomes one :class:`SpecError`."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(
            f"{path}: pipeline file not found (expected a YAML file, e.g. pipelines/specs/quickstart.yaml)"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of fields at the top level; found {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    try:
        return PipelineSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, raw, str(path))) from None
