"""Version constraints and markers as lockfiles and Poetry write them, in PEP 440/508 terms."""

from __future__ import annotations

import re
from typing import Any

from packaging.markers import InvalidMarker, Marker
from packaging.specifiers import InvalidSpecifier, SpecifierSet

from config.errors import SourceError

_POETRY_CLAUSE = re.compile(r"^(\^|~(?!=)|~=|===|==|!=|<=|>=|<|>|=)?\s*(\S+)$")


def _bump(release: list[int], index: int) -> str:
    upper = [*release[:index], release[index] + 1]
    return ".".join(str(p) for p in upper)


def _release(version: str, where: str) -> list[int]:
    core = re.match(r"^(\d+(?:\.\d+)*)", version)
    if core is None:
        raise SourceError(f"{where}: {version!r} is not a version.", "Fix the constraint.")
    return [int(p) for p in core.group(1).split(".")]


def _poetry_clause(clause: str, where: str) -> list[str]:
    clause = clause.strip()
    if clause in ("", "*"):
        return []
    match = _POETRY_CLAUSE.match(clause)
    if match is None:
        raise SourceError(f"{where}: {clause!r} is not a version constraint.", "Fix the constraint.")
    op, version = match.group(1) or "", match.group(2)
    if op == "^":
        release = _release(version, where)
        # Caret: the leftmost non-zero part may not change.
        index = next((i for i, p in enumerate(release) if p != 0), len(release) - 1)
        return [f">={version}", f"<{_bump(release, index)}"]
    if op == "~":
        release = _release(version, where)
        index = 0 if len(release) == 1 else 1
        return [f">={version}", f"<{_bump(release, index)}"]
    if op in ("", "="):
        return [f"=={version}"]
    return [f"{op}{version}"]


def poetry_specifiers(constraint: str, where: str) -> list[SpecifierSet]:
    """A Poetry constraint (``^3.8``, ``~1.2``, ``>=1,<2 || >=3``) as a union of specifier sets."""
    union: list[SpecifierSet] = []
    for alternative in constraint.split("||"):
        clauses = [c for c in re.split(r"\s*,\s*|\s+(?=[<>=!^~])", alternative.strip()) if c]
        parts: list[str] = []
        for clause in clauses:
            parts += _poetry_clause(clause, where)
        try:
            union.append(SpecifierSet(",".join(parts)))
        except InvalidSpecifier:
            raise SourceError(f"{where}: {constraint!r} is not a version constraint.",
                              "Fix the constraint.") from None
    return union


def _variable(variable: str, version: str) -> str:
    # python_version holds MAJOR.MINOR only: a full version compares as python_full_version.
    if variable == "python_version" and version.count(".") >= 2:
        return "python_full_version"
    return variable


def specifier_marker(specs: list[SpecifierSet], variable: str = "python_version") -> str | None:
    """A union of specifier sets over a marker variable, as a marker (None: always true)."""
    alternatives: list[str] = []
    for spec in specs:
        if not str(spec):
            return None
        clauses = [f'{_variable(variable, s.version)} {s.operator} "{s.version}"'
                   for s in sorted(spec, key=str)]
        alternatives.append(" and ".join(clauses))
    if not alternatives:
        return None
    if len(alternatives) == 1:
        return alternatives[0]
    return " or ".join(f"({a})" for a in alternatives)


def normal_marker(text: str, where: str) -> str:
    """A marker in packaging's normal spelling (so equal markers compare equal)."""
    try:
        return str(Marker(text))
    except InvalidMarker as exc:
        raise SourceError(f"{where}: marker {text!r} is not valid ({exc}).", "Fix the marker.") from None


def _spell(node: Any) -> str | None:
    """A parsed marker (packaging's nested list) with ``extra`` comparisons taken as true."""
    if isinstance(node, tuple):
        if any(str(getattr(side, "value", "")) == "extra" and type(side).__name__ == "Variable"
               for side in (node[0], node[2])):
            return None
        left, op, right = node
        return " ".join(f'"{x.value}"' if type(x).__name__ == "Value" else str(x.value)
                        for x in (left, op, right))
    alternatives: list[list[str]] = [[]]
    always = False
    for item in node:
        if item == "or":
            alternatives.append([])
        elif item != "and":
            spelled = _spell(item)
            if spelled is not None:
                alternatives[-1].append(f"({spelled})" if isinstance(item, list) else spelled)
    for conj in alternatives:
        always |= not conj
    if always:
        return None
    joined = [" and ".join(c) for c in alternatives]
    return joined[0] if len(joined) == 1 else " or ".join(f"({j})" if " and " in j else j for j in joined)


def marker_without_extra(text: str, where: str) -> str | None:
    """A lock's marker with its ``extra == ...`` clauses dropped (None: always).

    Which extras are installed is decided while walking the lock; pip, reading a
    requirements file, would take every ``extra`` clause as false and skip the package.
    """
    normal = normal_marker(text, where)
    if "extra" not in normal:
        return normal
    spelled = _spell(Marker(normal)._markers)
    return normal_marker(spelled, where) if spelled else None


#: A condition under which a locked package is installed: a set of conjunctions of
#: markers; ``{()}`` is "always".
Condition = frozenset[tuple[str, ...]]
ALWAYS: Condition = frozenset({()})
#: Conditions with more alternatives than this are not worth spelling out: the package is
#: installed unconditionally (pip then fails loudly if it has no files for the platform).
MAX_ALTERNATIVES = 16


def extend(condition: Condition, marker: str | None) -> Condition:
    """Every alternative of ``condition`` and also ``marker``."""
    if marker is None:
        return condition
    return frozenset(tuple(sorted({*conj, marker})) for conj in condition)


def union(a: Condition, b: Condition) -> Condition:
    merged = a | b
    if () in merged or len(merged) > MAX_ALTERNATIVES:
        return ALWAYS
    # An alternative implied by a weaker one adds nothing.
    return frozenset(c for c in merged if not any(o != c and set(o) <= set(c) for o in merged))


def condition_marker(condition: Condition) -> str | None:
    """The condition as one marker; None when it always holds."""
    if condition == ALWAYS or not condition:
        return None
    alternatives = []
    for conj in sorted(condition):
        parts = [f"({m})" if (" or " in m and len(conj) > 1) else m for m in conj]
        alternatives.append(" and ".join(parts))
    if len(alternatives) == 1:
        return alternatives[0]
    return " or ".join(f"({a})" for a in alternatives)


def poetry_requirement(name: str, spec: Any, where: str) -> tuple[str, bool]:
    """A ``[tool.poetry.dependencies]`` entry as a PEP 508 requirement, and whether it is optional.

    Refuses, naming the dependency, what a requirement cannot say (path dependencies,
    several constraints per Python, unions of ranges).
    """
    if isinstance(spec, list):
        raise SourceError(f"{where}: {name} has several constraints (one per Python or platform), "
                          "which buildq does not translate without a poetry.lock.",
                          "Run `poetry lock` and commit poetry.lock, or add a Dockerfile.")
    if isinstance(spec, str):
        spec = {"version": spec}
    if not isinstance(spec, dict):
        raise SourceError(f"{where}: {name} = {spec!r} is not a dependency.", "Fix pyproject.toml.")
    extras = spec.get("extras") or []
    head = name + (f"[{','.join(sorted(extras))}]" if extras else "")
    markers: list[str] = []
    if isinstance(spec.get("markers"), str):
        markers.append(normal_marker(spec["markers"], where))
    if isinstance(spec.get("python"), str):
        python = specifier_marker(poetry_specifiers(spec["python"], where))
        if python:
            markers.append(python)
    if isinstance(spec.get("platform"), str):
        markers.append(f'sys_platform == "{spec["platform"]}"')
    if "git" in spec:
        ref = spec.get("rev") or spec.get("tag") or spec.get("branch")
        url = str(spec["git"])
        url = url if url.startswith("git+") else f"git+{url}"
        line = f"{head} @ {url}" + (f"@{ref}" if ref else "")
        if spec.get("subdirectory"):
            line += f"#subdirectory={spec['subdirectory']}"
    elif "url" in spec:
        line = f"{head} @ {spec['url']}"
    elif "path" in spec:
        raise SourceError(f"{where}: {name} is a path dependency ({spec['path']}), which a "
                          "generated Dockerfile cannot install before the source is copied.",
                          "Publish it to an index, or add a Dockerfile.")
    else:
        version = spec.get("version", "*")
        parts = [str(s) for union_ in [poetry_specifiers(str(version), f"{where} {name}")]
                 for s in union_]
        if len(parts) > 1:
            raise SourceError(f"{where}: {name} = {version!r} is a union of ranges, which a "
                              "requirement cannot spell.", "Run `poetry lock` and commit poetry.lock.")
        line = head + (parts[0] if parts and parts[0] else "")
    if markers:
        line += " ; " + " and ".join(f"({m})" if " or " in m and len(markers) > 1 else m
                                     for m in markers)
    return line, bool(spec.get("optional"))
