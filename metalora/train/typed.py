"""Values checked against dataclass annotations: the one typed-field helper of every config section.

``coerce(value, hint, key)`` returns ``value`` as the annotation wants it (YAML 1.1 reads ``1e-4`` as a
string: a float field takes it as a number) or raises ``FieldTypeError`` naming ``key`` and the expected
type. ``coerce_fields(cls, values, prefix)`` does it for every key of a section and refuses unknown keys.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, Literal, get_args, get_origin, get_type_hints


class FieldTypeError(ValueError):
    """A config value of the wrong type or an unknown key."""


def coerce_fields(cls: type, values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    hints = get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        shown = [repr(k) for k in unknown]
        raise FieldTypeError(
            f"{prefix.rstrip('.') or 'config'}: unknown key(s) [{', '.join(shown)}]; known: {sorted(known)}"
        )
    return {k: coerce(v, hints[k], f"{prefix}{k}") for k, v in values.items()}


def coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as the annotation ``hint`` wants it, or a FieldTypeError naming ``key``."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except FieldTypeError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise FieldTypeError(f"{key}={value!r}: expected one of {list(args)}")
        return value
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise FieldTypeError(f"{key}={value!r}: expected a list")
        items = args if origin is tuple and args and args[-1] is not Ellipsis else None
        if items is not None and len(items) != len(value):
            raise FieldTypeError(f"{key}={value!r}: expected {len(items)} values")
        if items is not None:
            return tuple(
                coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, items, strict=True))
            )
        if origin is list and args:  # list[X]: every item an X
            return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return list(value) if origin is list or hint is list else tuple(value)
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise FieldTypeError(f"{key}={value!r}: expected a mapping")
        return dict(value)
    return _scalar(value, hint, key)


def _scalar(value: Any, hint: Any, key: str) -> Any:
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise FieldTypeError(f"{key}={value!r}: expected a finite number")
        return number
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise FieldTypeError(f"{key}={value!r}: expected an integer")
    if hint is bool and not isinstance(value, bool):
        raise FieldTypeError(f"{key}={value!r}: expected true or false")
    if hint is str and not isinstance(value, str):
        raise FieldTypeError(f"{key}={value!r}: expected a string")
    if isinstance(hint, type) and hint.__module__ == "builtins" and not isinstance(value, hint):
        raise FieldTypeError(f"{key}={value!r}: expected {hint.__name__}")
    return value
