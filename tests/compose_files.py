"""Reading the Compose files under compose/ the way `docker compose` does, without Docker: YAML
(anchors and merge keys included), variable interpolation with the files' own defaults, override
files merged onto a base, and the Compose Specification JSON schema to validate against.

The schema is the compose-spec project's `schema/compose-spec.json`
(https://github.com/compose-spec/compose-spec/blob/main/schema/compose-spec.json, JSON Schema
draft 2020-12) as vendored and kept current by the PyPI package check-jsonschema (a dev
dependency; `check-jsonschema --builtin-schema vendor.compose-spec` validates with the same file).
Tested with check-jsonschema 0.39.0 (its copy's sha256 starts d549057ebc2925f3)."""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_DIR = REPO / "compose"

_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?$", re.DOTALL)


def compose_schema() -> dict:
    """The Compose Specification JSON schema (draft 2020-12) shipped in check-jsonschema."""
    files = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((files / "compose-spec.json").read_text())


def schema_errors(document: dict) -> list[str]:
    """Every violation of the Compose Specification in `document`, as readable lines."""
    import jsonschema

    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                  for e in validator.iter_errors(document))


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """Compose variable interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err},
    ${VAR:+alt}, $VAR and $$ (a literal $), applied to every string value (not to keys)."""
    env = {} if env is None else env

    def sub(m: re.Match) -> str:
        if m.group("escaped"):
            return "$"
        if m.group("named"):
            return env.get(m.group("named"), "")
        b = _BRACED.match(m.group("braced"))
        if b is None:
            raise ValueError(f"invalid interpolation ${{{m.group('braced')}}}")
        name, op, arg = b.group("name"), b.group("op"), interpolate(b.group("arg") or "", env)
        val = env.get(name)
        if op is None:
            return val or ""
        if op in (":-", "-"):
            return arg if (val is None or (op == ":-" and val == "")) else val
        if op in (":?", "?"):
            if val is None or (op == ":?" and val == ""):
                raise ValueError(f"required variable {name} is unset: {arg}")
            return val
        return arg if (val is not None and (op == "+" or val != "")) else ""  # :+ and +

    if isinstance(value, Override):
        return Override(interpolate(value.value, env))
    if isinstance(value, str):
        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    return value


class Override:
    """A value tagged `!override`: replaces the base file's value instead of merging with it."""

    def __init__(self, value: Any) -> None:
        self.value = value


class _Loader(yaml.SafeLoader):
    pass


def _override(loader: yaml.SafeLoader, node: yaml.Node) -> Override:
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    return Override(loader.construct_scalar(node))


_Loader.add_constructor("!override", _override)


def _plain(value: Any) -> Any:
    """`value` with every Override marker replaced by its value."""
    if isinstance(value, Override):
        return _plain(value.value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def load_raw(name: str) -> Any:
    """The YAML of compose/NAME (anchors resolved, `!override` values kept as markers)."""
    with open(COMPOSE_DIR / name) as f:
        return yaml.load(f, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def load(name: str, *overrides: str, env: dict[str, str] | None = None) -> dict:
    """A compose file (plus override files, merged in order) after interpolation with `env`
    (default: no variables set, so every ${VAR:-default} takes its documented default)."""
    doc = _plain(interpolate(load_raw(name), env))
    for o in overrides:
        doc = merge(doc, interpolate(load_raw(o), env))
    return _plain(doc)


def merge(base: Any, override: Any, path: tuple[str, ...] = ()) -> Any:
    """Compose's override merge (the part these files use): mappings merge key by key,
    `command`/`entrypoint`/healthcheck `test` and `!override` values are replaced, other
    sequences are appended."""
    if isinstance(override, Override):
        return copy.deepcopy(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merge(base[k], v, (*path, k)) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(override, list):
        if path and path[-1] in ("command", "entrypoint", "test"):
            return copy.deepcopy(override)
        return base + [v for v in override if v not in base]
    return copy.deepcopy(override)


def services(doc: dict) -> dict[str, dict]:
    return doc.get("services", {})


def argv(value: str | list[str] | None) -> list[str]:
    """A service's command as argv (a string is split like a shell would)."""
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def environment(service: dict) -> dict[str, str]:
    """A service's environment as a dict (list form KEY=VALUE accepted)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def is_one_shot(service: dict) -> bool:
    """A job that runs to completion (others wait for it with service_completed_successfully)."""
    return str(service.get("restart", "no")) == "no"


def depends_on(service: dict) -> dict[str, str]:
    """name -> condition (the short list form means service_started)."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def start_order(doc: dict) -> list[str]:
    """Services in dependency order (dependencies first)."""
    svcs, order, seen = services(doc), [], set()

    def visit(name: str, stack: tuple[str, ...] = ()) -> None:
        if name in stack:
            raise ValueError(f"dependency cycle: {' -> '.join((*stack, name))}")
        if name in seen:
            return
        for dep in depends_on(svcs[name]):
            visit(dep, (*stack, name))
        seen.add(name)
        order.append(name)

    for name in svcs:
        visit(name)
    return order


def container_ports(service: dict) -> set[int]:
    """Container-side ports a service exposes to the network or publishes."""
    ports: set[int] = set()
    for p in service.get("expose") or []:
        ports.add(int(str(p).split("/")[0]))
    for p in service.get("ports") or []:
        target = p.get("target") if isinstance(p, dict) else str(p).split("/")[0].rsplit(":", 1)[-1]
        ports.add(int(target))
    return ports


def published_ports(service: dict) -> dict[int, str]:
    """container port -> the host side ('[ip:]port') of each published port."""
    out = {}
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            out[int(p["target"])] = f"{p.get('host_ip', '')}:{p.get('published', '')}"
        else:
            host, _, target = str(p).split("/")[0].rpartition(":")
            out[int(target)] = host
    return out
