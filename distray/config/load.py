"""Loading a config: YAML, dotted overrides, errors that name the field and the fix, and dumping."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from distray.config.base import HFTeacher, OpenAITeacher, VLLMTeacher
from distray.config.root import DistrayConfig, deep_merge
from distray.errors import ConfigError

# --------------------------------------------------------------------------------------------
# loading, overrides, errors
# --------------------------------------------------------------------------------------------


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn `["train.lr=1e-5", "teacher.kind=hf"]` into a nested dict.

    Values are parsed as YAML scalars/flow collections (`1e-5` → float, `[1,4]` → list,
    `null` → None).

    Raises:
        ConfigError: an item has no `=` or an empty key.
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override `{item}` is not key=value; write it as e.g. train.lr=1e-5")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override `{item}` has an empty key; write it as section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        # YAML reads 1e-5 as a string (no dot); numbers are what users mean.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in "eE.") else value
            except ValueError:
                pass
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override `{item}` sets inside `{p}`, which is not a section")
        node[parts[-1]] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return `data` with dotted `key=value` overrides merged in."""
    return deep_merge(data, parse_overrides(overrides))


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Follow a pydantic error location to the model class that owns its last key."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            # discriminated-union tag (vllm/openai/hf) appears in the location
            for cls in (VLLMTeacher, OpenAITeacher, HFTeacher):
                if cls.model_fields["kind"].default == part:
                    current = cls
                    break
            else:
                return None
            continue
        current = _unwrap_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap_model(annotation: Any) -> Any:
    """The BaseModel class inside `X | None`, `list[X]`, `Annotated[...]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(
            str(p) for p in loc if not (isinstance(p, str) and p in ("vllm", "openai", "hf"))
        )
        if e["type"] == "extra_forbidden":
            owner = _model_at(DistrayConfig, loc)
            names = list(owner.model_fields) if owner else []
            key = str(loc[-1])
            # Prefix matches first (`lr_rate` → `lr`), then spelling neighbours (`lrr` → `lr`).
            prefix = [n for n in names if key.startswith(n + "_") or n.startswith(key)]
            close = prefix + [
                n for n in difflib.get_close_matches(key, names, n=3, cutoff=0.6) if n not in prefix
            ]
            close = close[:3]
            hint = (
                "did you mean "
                + " or ".join(f"`{'.'.join(path.split('.')[:-1] + [c])}`" for c in close)
                + "?"
                if close
                else f"valid names here: {', '.join(names)}"
            )
            lines.append(f"`{path}` is not a setting; {hint}")
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            got = e.get("input", {}).get("kind") if isinstance(e.get("input"), dict) else None
            what = f"is {got!r}" if got is not None else "is missing"
            lines.append(
                f"`{path}.kind` {what}; set it to vllm (local engines), openai (an "
                "OpenAI-compatible API) or hf (transformers)"
            )
        elif e["type"] == "value_error" or not path:
            msg = str(e.get("msg", "")).removeprefix("Value error, ")
            lines.append(msg if not path else f"`{path}`: {msg}")
        else:
            got = e.get("input")
            got_s = repr(got) if not isinstance(got, dict) else "a mapping"
            lines.append(f"`{path}` ({got_s}): {e['msg']}")
    return f"invalid config {source}:\n  " + "\n  ".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "(dict)") -> DistrayConfig:
    """Validate a plain dict into a `DistrayConfig`.

    Raises:
        ConfigError: with one line per problem, each naming the field, the value and the fix.
    """
    if not isinstance(data, dict):
        raise ConfigError(
            f"config {source} must be a mapping of sections, got {type(data).__name__}"
        )
    try:
        return DistrayConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from e


def load_config(
    path: str | os.PathLike[str] | None, overrides: list[str] | None = None
) -> DistrayConfig:
    """Load a YAML config, apply dotted overrides, validate.

    Args:
        path: YAML file; None starts from defaults.
        overrides: `section.key=value` strings.

    Raises:
        ConfigError: unreadable YAML, unknown keys, wrong types, contradictions.
    """
    data: dict[str, Any] = {}
    source = "(defaults)"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(
                f"config file `{p}` does not exist; pass a YAML file, e.g. jobs/configs/quickstart.yaml"
            )
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file `{p}` is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file `{p}` must hold a mapping of sections")
        data = loaded
    if overrides:
        data = apply_overrides(data, overrides)
    return config_from_dict(data, source)


#: Words that mark a name (env var, header, body field) as holding a secret.
_SECRET_WORDS = frozenset({
    "token", "key", "apikey", "secret", "password", "passwd", "pass", "auth", "authorization",
    "credential", "credentials", "cookie", "signature",
})

REDACTED = "<redacted>"

# `scheme://user:password@host` in any string value: the userinfo is a credential.
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def is_secret_name(name: str) -> bool:
    """True for names like HF_TOKEN, OPENAI_API_KEY, AWS_SECRET_ACCESS_KEY, Authorization.

    Words are split at `_`, `-`, `.` and case changes, so `max_tokens` and
    TOKENIZERS_PARALLELISM are not secrets, and a name ending in `_env` (`api_key_env`) names
    a variable rather than holding a value.
    """
    words = [w.lower() for w in re.split(r"[_\-.\s]+|(?<=[a-z])(?=[A-Z])", name) if w]
    if not words or words[-1] == "env":
        return False
    return any(w in _SECRET_WORDS for w in words)


def redact(value: Any, mask: Any = None) -> Any:
    """A copy of a dumped config (or any part) with secrets masked.

    Values under secret-looking keys (at any depth: `resources.env`, `extra_body`,
    `engine_kwargs`, ...) become `mask(value)` (default `<redacted>`), and `user:password@` in
    URL strings becomes `<redacted>@`.
    """
    mask = mask or (lambda v: REDACTED)
    if isinstance(value, dict):
        return {
            k: (mask(v) if isinstance(k, str) and is_secret_name(k) and isinstance(v, (str, int))
                and v != "" else redact(v, mask))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v, mask) for v in value]
    if isinstance(value, str) and "@" in value:
        return _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", value)
    return value


def secret_env(cfg: DistrayConfig) -> dict[str, str]:
    """`resources.env` entries whose names look secret: they travel as env vars, never in files."""
    return {k: v for k, v in cfg.resources.env.items() if is_secret_name(k)}


def dump_config(cfg: DistrayConfig, *, redact_secrets: bool = True, drop_secret_env: bool = False) -> str:
    """The resolved config as YAML (every field, defaults included).

    Args:
        cfg: the config.
        redact_secrets: mask secrets (see `redact`), so config.resolved.yaml and logs hold none.
        drop_secret_env: leave secret `resources.env` entries out altogether: a config shipped to
            a Ray job, whose secrets travel as the job's environment variables instead.
    """
    data = cfg.model_dump(mode="json")
    if drop_secret_env:
        data["resources"]["env"] = {k: v for k, v in data["resources"]["env"].items() if not is_secret_name(k)}
    if redact_secrets:
        data = redact(data)
    return yaml.safe_dump(data, sort_keys=False)
