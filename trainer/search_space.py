"""Search-space files: parameter definitions in YAML, sampled through an Optuna trial.

A search-space file is a mapping with two sections::

    params:                 # required, sampled once per trial in file order
      lr:        {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
      channels:  {type: int, low: 8, high: 32, step: 8}
      optimizer: {type: categorical, choices: [adam, sgd]}
    fixed:                  # optional, handed to the objective unchanged
      epochs: 10

``float`` and ``int`` take ``low``, ``high`` and optionally ``log`` (default false) or
``step``, never both, as in ``Trial.suggest_float`` and ``Trial.suggest_int``.
``categorical`` takes ``choices``: a list of null, bool, int, float or str values.
PyYAML reads ``1e-4`` (no dot) as a string, so numeric strings in bounds are accepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_NUMERIC_KEYS = {"low", "high", "step"}
_ALLOWED_KEYS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}
_CHOICE_TYPES = (type(None), bool, int, float, str)


class SearchSpaceError(Exception):
    """A search-space file that cannot be read or is invalid."""


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a search space, as written in the file."""

    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """Sample this parameter through ``trial`` (an ``optuna.Trial``)."""
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.name, list(self.choices))


@dataclass(frozen=True)
class SearchSpace:
    """Parameters to sample per trial and fixed settings passed to the objective."""

    params: tuple[ParamSpec, ...]
    fixed: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def sample(self, trial: Any) -> dict[str, Any]:
        """Sample every parameter through ``trial`` and return them by name."""
        return {spec.name: spec.suggest(trial) for spec in self.params}


def load_search_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space file; raise SearchSpaceError naming the problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SearchSpaceError(f"cannot read search-space file {path}: {error.strerror}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        reason = " ".join(str(error).split())
        raise SearchSpaceError(f"search-space file {path} is not valid YAML: {reason}") from None
    return parse_search_space(document, source=str(path))


def parse_search_space(document: Any, source: str = "<search space>") -> SearchSpace:
    """Validate an already-parsed search-space document."""
    if not isinstance(document, dict):
        raise SearchSpaceError(f"{source}: expected a mapping with a 'params' section")
    unknown = sorted(set(document) - {"params", "fixed"})
    if unknown:
        raise SearchSpaceError(
            f"{source}: unknown top-level key(s) {', '.join(map(str, unknown))}; "
            "expected 'params' and optionally 'fixed'"
        )

    params = document.get("params")
    if not isinstance(params, dict) or not params:
        raise SearchSpaceError(f"{source}: 'params' must be a non-empty mapping of parameter names")
    fixed = document.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise SearchSpaceError(f"{source}: 'fixed' must be a mapping")

    specs = tuple(_parse_param(source, str(name), body) for name, body in params.items())
    clashes = sorted(set(map(str, fixed)) & {spec.name for spec in specs})
    if clashes:
        raise SearchSpaceError(
            f"{source}: {', '.join(clashes)} is both sampled in 'params' and set in 'fixed'"
        )
    return SearchSpace(params=specs, fixed=dict(fixed), source=source)


def _parse_param(source: str, name: str, body: Any) -> ParamSpec:
    def invalid(reason: str) -> SearchSpaceError:
        return SearchSpaceError(f"{source}: parameter '{name}': {reason}")

    if not isinstance(body, dict):
        raise invalid("expected a mapping with 'type' and its settings")
    kind = body.get("type")
    if kind not in _ALLOWED_KEYS:
        raise invalid(f"type must be float, int or categorical, got {kind!r}")
    unknown = sorted(set(map(str, body)) - _ALLOWED_KEYS[kind])
    if unknown:
        raise invalid(f"unknown key(s) {', '.join(unknown)} for type {kind}")

    if kind == "categorical":
        return _parse_categorical(name, body, invalid)
    return _parse_numeric(name, kind, body, invalid)


def _parse_categorical(name: str, body: dict, invalid) -> ParamSpec:
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise invalid("'choices' must be a non-empty list")
    for choice in choices:
        if not isinstance(choice, _CHOICE_TYPES):
            raise invalid(f"choice {choice!r} is not null, bool, int, float or str")
    if len(set(map(repr, choices))) != len(choices):
        raise invalid("'choices' contains duplicates")
    return ParamSpec(name=name, type="categorical", choices=tuple(choices))


def _parse_numeric(name: str, kind: str, body: dict, invalid) -> ParamSpec:
    values = {}
    for key in sorted(_NUMERIC_KEYS & set(body)):
        values[key] = _to_number(body[key], kind, key, invalid)
    for key in ("low", "high"):
        if key not in values:
            raise invalid(f"missing '{key}'")
    low, high, step = values["low"], values["high"], values.get("step")

    log = body.get("log", False)
    if not isinstance(log, bool):
        raise invalid(f"'log' must be true or false, got {log!r}")
    if low > high:
        raise invalid(f"low ({low}) is greater than high ({high})")
    if log and step is not None:
        raise invalid("'log' and 'step' cannot be used together")
    if log and low <= 0:
        raise invalid(f"low ({low}) must be positive when log is true")
    if step is not None and step <= 0:
        raise invalid(f"step ({step}) must be positive")
    return ParamSpec(name=name, type=kind, low=low, high=high, log=log, step=step)


def _to_number(raw: Any, kind: str, key: str, invalid) -> float | int:
    if isinstance(raw, bool):
        raise invalid(f"'{key}' must be a number, got {raw!r}")
    value = raw
    if isinstance(raw, str):
        try:
            value = float(raw)
        except ValueError:
            raise invalid(f"'{key}' must be a number, got {raw!r}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(f"'{key}' must be a finite number, got {raw!r}")
    if kind == "int":
        if value != int(value):
            raise invalid(f"'{key}' must be an integer for type int, got {raw!r}")
        return int(value)
    return float(value)
