"""The schema of ``plugins.toml``: which component plays each role, and its settings.

One table per role; the roles are the component kinds (:data:`KINDS`). Each
table names a registered component with ``name``; every other key is a setting
of that component, validated later by the component's own ``Settings`` model
(this module cannot know them: it only checks the file's shape)::

    [substrate]
    name = "learned"

    [attention_backend]
    name = "sdpa"

``substrate = "learned"`` is accepted as shorthand for a table with only a name.
Errors are :class:`PluginsFileError`, one line each, in the form
``role.field: message``.
"""

from __future__ import annotations

import sys
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from arbor_plugins.registry import KINDS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["PluginsFile", "PluginsFileError", "RoleTable", "describe_validation_error", "parse_plugins_toml"]


class PluginsFileError(ValueError):
    """``plugins.toml`` is malformed or does not follow the schema (one-line message)."""


class RoleTable(BaseModel):
    """The table of one role: the component's ``name`` and its settings."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @property
    def settings(self) -> dict[str, Any]:
        """Every key of the table but ``name``: the component's settings, unvalidated."""
        return dict(self.model_extra or {})


class PluginsFile(BaseModel):
    """The whole file: at most one table per role, every role optional."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    trigger: RoleTable | None = None
    insertion_policy: RoleTable | None = None
    init_scheme: RoleTable | None = None
    freeze_policy: RoleTable | None = None
    substrate: RoleTable | None = None
    attention_backend: RoleTable | None = None
    rope_scaling: RoleTable | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_roles(cls, data: Any) -> Any:
        # pydantic's own "Extra inputs are not permitted" would not say what is allowed.
        if isinstance(data, dict):
            unknown = sorted(k for k in data if k not in KINDS)
            if unknown:
                raise PluginsFileError(
                    f"unknown role {unknown[0]!r}; valid roles: {', '.join(KINDS)}"
                )
        return data

    def roles(self) -> dict[str, RoleTable]:
        """The roles the file fills, in :data:`KINDS` order."""
        return {kind: table for kind in KINDS if (table := getattr(self, kind)) is not None}


# The schema must follow the registry: a kind added there needs a role here.
assert tuple(PluginsFile.model_fields) == KINDS, "PluginsFile fields must match registry.KINDS"


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """Condense a pydantic error to one line: ``prefix.field: message (got value)``.

    Several problems are joined with ``; `` so the user sees them all without
    pydantic's multi-line report and documentation links.
    """
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        elif "input" in err and err["type"] != "missing":
            msg = f"{msg} (got {err['input']!r})"
        parts.append(f"{loc or prefix or 'value'}: {msg}")
    return "; ".join(parts)


def parse_plugins_toml(text_or_dict: str | dict[str, Any]) -> PluginsFile:
    """Parse and check the shape of a ``plugins.toml`` (its text, or an already-parsed dict)."""
    data = text_or_dict
    if isinstance(text_or_dict, str):
        try:
            data = tomllib.loads(text_or_dict)
        except tomllib.TOMLDecodeError as exc:
            raise PluginsFileError(f"invalid TOML: {exc}") from None
    if not isinstance(data, dict):
        raise PluginsFileError(f"expected a TOML document (tables), got {type(data).__name__}")
    try:
        return PluginsFile.model_validate(data)
    except PluginsFileError:
        raise
    except ValidationError as exc:
        # A PluginsFileError raised inside a validator arrives wrapped; unwrap it.
        for err in exc.errors():
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, PluginsFileError):
                raise cause from None
        raise PluginsFileError(_describe_file_error(exc)) from None


def _describe_file_error(exc: ValidationError) -> str:
    # Say "must be a table with a name" rather than pydantic's model-type jargon.
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "model_type":
            parts.append(f"{loc}: must be a table with a 'name' key (got {err['input']!r})")
        elif err["type"] == "missing" and err["loc"][-1] == "name":
            parts.append(f"{loc}: missing; every role table needs name = \"<component>\"")
        else:
            parts.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)
