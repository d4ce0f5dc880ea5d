"""`mmcl run --help`'s list of config keys: every field of the run config with its default and the attribute
docstring written under it in `mmcl.config` (so the help can never disagree with the code)."""

from __future__ import annotations

import dataclasses
import typing

from mmcl.config import RunConfig


def field_help(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field, read from the attribute docstrings above; used by `--help`."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = " ".join(str(b.value.value).split())  # type: ignore[union-attr]
    rows = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(hint):
            rows += field_help(hint, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if key == "strategies":
            default = [s.name for s in default]
        rows.append((key, repr(default), docs.get(f.name, "")))
    return rows
