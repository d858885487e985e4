"""Pydantic plumbing shared by the two files edgekit reads: manifest.json and devices.yaml.

Each file's contract is one set of pydantic models (edgekit/manifest.py, edgekit/profiles.py);
its JSON Schema is generated from them. This module holds what both need:

- strict scalar types, because in a JSON or YAML file "256" is not 256 and true is not 1;
- a frozen base model that also takes positional arguments (TensorSpec("ids", "int64", (1,)));
- `describe`, which turns a pydantic error into one line naming the key path, the way
  every edgekit error is one line;
- `schema_text` and `schema_main`, which write the generated schema (`--schema`).
"""

from __future__ import annotations

import json
import sys
from contextvars import ContextVar
from typing import Annotated, Any, Callable, Literal, Sequence

from pydantic import AllowInfNan, BaseModel, ConfigDict, Strict, ValidationError
from pydantic_core import ErrorDetails

Int = Annotated[int, Strict()]
# Strict still takes an int (1 is a fine 1.0); inf and NaN are no setting's sensible value.
Float = Annotated[float, Strict(), AllowInfNan(False)]
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]


_depth: ContextVar[int] = ContextVar("edgekit_contract_depth", default=0)


class Frozen(BaseModel):
    """Immutable, field names are the file's keys, unknown keys ignored (subclasses may forbid)."""

    model_config = ConfigDict(frozen=True, extra="ignore", protected_namespaces=(),
                              # JSON's NaN/Infinity in free-form `extra` values survive a round trip.
                              ser_json_inf_nan="constants",
                              # The schema describes what edgekit writes: every key, defaults included.
                              json_schema_serialization_defaults_required=True)

    def __init__(self, *args: Any, **fields: Any) -> None:
        if args:
            names = list(type(self).model_fields)
            if len(args) > len(names):
                raise TypeError(f"{type(self).__name__} takes at most {len(names)} positional arguments")
            fields.update(zip(names, args))
        # Pydantic validates a nested model through this __init__ too, and prefixes a nested
        # ValidationError with its key path; only the outermost call turns it into an edgekit error.
        outer = _depth.get()
        token = _depth.set(outer + 1)
        try:
            super().__init__(**fields)
        except ValidationError as exc:
            if outer:
                raise
            raise self._error(exc) from None
        finally:
            _depth.reset(token)

    @classmethod
    def _error(cls, exc: ValidationError) -> Exception:
        """The exception a failed construction raises; subclasses turn it into an edgekit error."""
        return exc

    def replace(self, **changes: Any) -> Any:
        """A copy with `changes`, validated again (pydantic's model_copy does not validate)."""
        return type(self)(**{**{name: getattr(self, name) for name in type(self).model_fields}, **changes})


def key_path(loc: Sequence[int | str]) -> str:
    """('methods', 1, 'inputs', 0, 'dtype') -> "methods[1].inputs[0].dtype"."""
    out = ""
    for part in loc:
        # A key from the file may hold a newline or control characters: quote it, so the error stays one line.
        name = part if isinstance(part, int) or part.isprintable() else repr(part)
        out += f"[{name}]" if isinstance(part, int) else (f".{name}" if out else name)
    return out


# Pydantic's wording names Python types ("a valid integer", "a valid dictionary"); a file's
# reader thinks in the file's terms.
_TYPE_WORDS = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "string_type": "a string", "bool_type": "true or false",
    "list_type": "a list", "tuple_type": "a list",
}
_MAPPING_TYPES = ("dict_type", "model_type", "model_attributes_type")


def describe(error: ErrorDetails, *, mapping: str = "a mapping") -> tuple[str, str]:
    """(key path, what is wrong) for one pydantic error, e.g. ("max_context", "must be an integer, got '256'")."""
    kind, ctx = error["type"], error.get("ctx", {})
    path = key_path(error["loc"])
    value = error["input"]
    # A scalar helps ("got '256'"); a whole nested object is noise on a one-line error.
    got = f", got {value!r:.60}" if value is None or isinstance(value, (str, int, float)) else ""
    if kind == "missing":
        return path, "is missing"
    if kind == "extra_forbidden":
        return path, "is unknown"
    if kind in _TYPE_WORDS or kind in _MAPPING_TYPES:
        return path, f"must be {_TYPE_WORDS.get(kind, mapping)}{got}"
    if kind == "literal_error":
        return path, f"must be one of {ctx['expected']}{got}"
    if kind == "greater_than_equal":
        return path, f"must be at least {ctx['ge']}{got}"
    if kind == "less_than_equal":
        return path, f"must be at most {ctx['le']}{got}"
    if kind == "too_short" and ctx.get("min_length") == 1:
        return path, "must not be empty"
    if kind == "value_error":
        return path, f"{ctx['error']}{got}"
    message = error["msg"]
    return path, f"{message[0].lower()}{message[1:]}".replace("input should", "must") + got


def first_error(exc: ValidationError, *, mapping: str = "a mapping") -> tuple[str, str]:
    """`describe` of the first error: one line per failure, the first is the one to fix first.

    `mapping` is the file's word for a key-value object ("an object" in JSON).
    """
    return describe(exc.errors(include_url=False)[0], mapping=mapping)


def schema_text(model: type[BaseModel], title: str, schema_id: str, *,
                mode: Literal["validation", "serialization"]) -> str:
    """The JSON Schema of `model` as it is committed (sorted keys, trailing newline).

    mode "serialization" describes a file edgekit writes (every key present), "validation"
    one a person writes (keys with defaults may be left out).
    """
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": schema_id,
              **model.model_json_schema(mode=mode), "title": title}
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def schema_main(write: Callable[[], str], argv: Sequence[str] | None = None) -> int:
    """`python -m edgekit.<module> --schema`: print the generated schema (redirect it to the committed file)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["--schema"]:
        print("usage: --schema  (prints the generated JSON Schema)", file=sys.stderr)
        return 2
    sys.stdout.write(write())
    return 0
