"""One line for a pydantic ValidationError, naming the key: what every config model reports to the user
(the distill job config, the loss and policy parameters). Standard library and pydantic only, so that
any config module can import it without pulling in torch or Prefect.

    unknown config key 'epoch' (did you mean 'epochs'?)
    config key 'epochs' must be int, got '3'
    loss 'kd': parameter 'T' must be float, got 'hot'
    missing config key 'student'

A validator's own ValueError is already the sentence the user reads (it names its key), so it comes
through as written; pydantic's own errors are worded here.
"""
from __future__ import annotations

import difflib
from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.dataclasses import is_pydantic_dataclass

# pydantic's error type -> what the value must be (ctx fills the braces).
_PREDICATES = {
    "int_type": "must be int", "int_parsing": "must be int", "int_from_float": "must be int",
    "float_type": "must be float", "float_parsing": "must be float", "finite_number": "must be a finite number",
    "bool_type": "must be bool", "bool_parsing": "must be bool",
    "string_type": "must be a string", "list_type": "must be a list", "dict_type": "must be a mapping",
    "model_type": "must be a mapping", "model_attributes_type": "must be a mapping",
    "greater_than": "must be > {gt}", "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}", "less_than_equal": "must be <= {le}",
    "too_short": "must have at least {min_length} items", "too_long": "must have at most {max_length} items",
    "literal_error": "must be {expected}",
}


# an unknown key: of a model, or a keyword of a pydantic dataclass (the stage configs)
_UNKNOWN = ("extra_forbidden", "unexpected_keyword_argument")


def key_path(loc: tuple[Any, ...]) -> str:
    """('loss', 'extra', 0, 'T') -> 'loss.extra[0].T'."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _fields(model: Any) -> dict:
    """The fields of a pydantic model or of a pydantic dataclass (the stage configs)."""
    return getattr(model, "__pydantic_fields__", None) or getattr(model, "model_fields", {})


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and (issubclass(annotation, BaseModel) or is_pydantic_dataclass(annotation))


def _walk(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], int, type[BaseModel] | None]:
    """(loc without pydantic's union member tags, length of the part that names a union field or 0,
    the model whose field the last key is). A value that fits none of a union's types fails each
    member under a tagged loc: ('eval', 'str'), ('eval', 'list[str]', 0)."""
    keys: list[Any] = []
    union_len, current, parent = 0, model, None
    parts = iter(loc)
    element = None  # the model of a list's items: the next part is an index into it
    for part in parts:
        keys.append(part)
        if isinstance(part, int) and element is not None:
            current, element = element, None
            continue
        parent, field = current, _fields(current).get(part) if current and isinstance(part, str) else None
        current = None
        if field is None:
            continue
        members = [a for a in get_args(field.annotation) if a is not type(None)] \
            if get_origin(field.annotation) in (Union, UnionType) else [field.annotation]
        if len(members) > 1:
            union_len = union_len or len(keys)
            next(parts, None)  # the member tag
        elif _is_model(members[0]):
            current = members[0]
        elif get_origin(members[0]) is list and _is_model(get_args(members[0])[0]):
            element = get_args(members[0])[0]
    return tuple(keys), union_len, parent


def did_you_mean(key: str, known: list[str]) -> str:
    """' (did you mean 'epochs'?)' for a near miss, else the known keys."""
    by_lower = {k.lower(): k for k in known}  # 't' is a near miss of 'T'
    close = difflib.get_close_matches(key.lower(), by_lower, n=1)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else f" (known: {', '.join(known) or 'none'})"


def _predicate(error: dict) -> str:
    ctx = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in error.get("ctx", {}).items()}
    if error["type"] in ("string_too_short", "too_short") and ctx["min_length"] == 1:
        return "must be a non-empty string" if error["type"] == "string_too_short" else "must not be empty"
    template = _PREDICATES.get(error["type"])
    if template is None:  # pydantic's own words, in ours: "Input should be a valid date" -> "must be a valid date"
        return error["msg"].replace("Input should be", "must be", 1)
    return template.format(**ctx)


def _is_type_error(error: dict) -> bool:
    return error["type"].endswith(("_type", "_parsing"))


def _union_field(model: type[BaseModel], errors: list[dict], field: tuple[Any, ...]) -> tuple[tuple, str, Any]:
    """(loc, predicate, value) for a union field's errors, one per member type. A value of one of the
    types (a list) is judged by that type alone: 'eval[1]' must be a string. A value of none of them
    gets what each type wants: 'eval' must be a string or a list."""
    members = [e for e in errors if _walk(model, e["loc"])[0][:len(field)] == field]
    inside = [e for e in members if len(e["loc"]) > len(field) + 1 or not _is_type_error(e)]
    if inside:
        return _walk(model, inside[0]["loc"])[0], _predicate(inside[0]), inside[0]["input"]
    wanted = dict.fromkeys(_predicate(e).removeprefix("must be ") for e in members)
    return field, "must be " + " or ".join(wanted), members[0]["input"]


def validation_line(exc: ValidationError, model: type[BaseModel], where: str = "", noun: str = "key") -> str:
    """The first error of `exc` (raised validating `model`) as one line: `where` (e.g. "loss 'kd': ")
    then the key named as `noun 'a.b[0].c'` and what is wrong with its value. An unknown key comes
    first: a misspelt key is also a missing one, and its did-you-mean is the useful hint."""
    errors = exc.errors(include_url=False)
    first = min(errors, key=lambda e: e["type"] not in _UNKNOWN)
    loc, union_len, parent = _walk(model, first["loc"])
    if first["type"] in _UNKNOWN:
        hint = did_you_mean(str(loc[-1]), list(_fields(parent))) if parent else ""
        return f"{where}unknown {noun} {key_path(loc)!r}{hint}"
    if first["type"] in ("missing", "missing_argument"):
        return f"{where}missing {noun} {key_path(loc)!r}"
    if first["type"] in ("value_error", "assertion_error"):
        # a validator's sentence names its key; inside a section (`index` of a pipeline) it gets the section too
        message = str(first["ctx"]["error"]) if "ctx" in first else first["msg"]
        section = key_path(loc[:-1]) if len(loc) > 1 else ""
        return f"{where}{section}: {message}" if section and not message.startswith(section) else f"{where}{message}"
    if union_len:
        loc, predicate, value = _union_field(model, errors, loc[:union_len])
    else:
        predicate, value = _predicate(first), first["input"]
    if not loc:
        return f"{where}{predicate}, got {type(value).__name__}"
    return f"{where}{noun} {key_path(loc)!r} {predicate}, got {value!r}"
