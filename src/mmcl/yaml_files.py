"""Reading a YAML file that must hold a mapping, with one clean error line (file and problem) for every failure."""

from __future__ import annotations

from pathlib import Path

import yaml


def read_yaml_mapping(path: Path, error: type[Exception], expected: str = "a mapping at the top level",
                      empty_ok: bool = False) -> dict:
    """The mapping in the YAML file `path`; invalid YAML or another top-level type raises `error` with one line that
    names the file (`expected` says what should be there). An empty file is `{}` when `empty_ok`."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from e
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: expected {expected}, got {type(data).__name__}")
    return data
