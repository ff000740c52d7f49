"""Lockfiles read into pinned requirements: uv.lock, poetry.lock, pdm.lock, Pipfile.lock.

The pins are written into the generated Dockerfile and installed with pip alone (with
``--require-hashes`` when the lock has hashes): no uv, Poetry, PDM or Pipenv in the image
or in the build, the pins are part of the hashed text, and the same lock always gives
the same layer. Only the project's runtime dependencies are taken (no dev groups), plus
the extras named in ``builder.pip.extras``. Each pin carries the marker under which the
lock installs it (the conditions along the dependency paths that reach it), so pip
decides in the image what applies to its Python and platform, as the tools would.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import parse_qs, urlsplit

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from config.errors import SourceError
from workers.dockerfile.constraints import (
    ALWAYS,
    Condition,
    condition_marker,
    extend,
    marker_without_extra,
    normal_marker,
    poetry_specifiers,
    specifier_marker,
    union,
)
from workers.dockerfile.project import Project, canonical, wheel_platform_ok

#: Lockfiles in the order they are looked for, with the tool each belongs to.
LOCKFILES = (("uv.lock", "uv"), ("poetry.lock", "poetry"), ("pdm.lock", "pdm"),
             ("Pipfile.lock", "pipenv"))
_PYPI_HOSTS = ("pypi.org", "files.pythonhosted.org", "pypi.python.org")
_LEADING_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Pin:
    """One locked distribution as a requirement line."""

    name: str
    requirement: str
    marker: str | None = None
    hashes: tuple[str, ...] = ()
    #: A git dependency: the image needs git to install it, and pip cannot check a hash.
    vcs: bool = False
    #: Names of the wheels the lock lists for it (to tell which Pythons it has builds for).
    wheels: tuple[str, ...] = field(default=(), compare=False)

    def line(self, hashes: bool) -> str:
        text = self.requirement + (f" ; {self.marker}" if self.marker else "")
        if hashes:
            text += "".join(f" --hash={h}" for h in self.hashes)
        return text


@dataclass(frozen=True)
class Locked:
    """What a lockfile pins for the project's runtime."""

    lock: str
    pins: tuple[Pin, ...]
    #: Package indexes other than PyPI that pins come from.
    indexes: tuple[str, ...] = ()


# --- walking a locked dependency graph ----------------------------------------------------


@dataclass(frozen=True)
class _Edge:
    name: str
    marker: str | None = None
    extras: frozenset[str] = frozenset()
    #: Which of several locked versions of ``name`` this edge means (None: the only one).
    accepts: Callable[[str], bool] | None = field(default=None, compare=False)
    what: str = ""


def _walk(lock: str, roots: list[_Edge], candidates: Callable[[str], list[int]],
          version_of: Callable[[int], str], edges: Callable[[int, frozenset[str]], list[_Edge]],
          ) -> dict[int, Condition]:
    """Every locked package the roots reach, with the condition under which it is installed."""
    condition: dict[int, Condition] = {}
    extras: dict[int, frozenset[str]] = {}
    todo: list[int] = []

    def reach(edge: _Edge, parent: Condition) -> None:
        found = candidates(edge.name)
        if edge.accepts is not None and len(found) > 1:
            found = [i for i in found if edge.accepts(version_of(i))]
        if not found:
            raise SourceError(f"{lock} has no entry for {edge.what or edge.name}, which the "
                              "project depends on: the lock is out of date.",
                              "Update the lock with its tool and commit it.")
        if len(found) > 1:
            versions = ", ".join(sorted({version_of(i) for i in found}))
            raise SourceError(f"{lock} holds {edge.name} in several versions ({versions}) and "
                              "buildq cannot tell which one the project needs.",
                              "Add a Dockerfile that installs with the lock's own tool.")
        index = found[0]
        merged = union(condition.get(index, frozenset()), extend(parent, edge.marker))
        more = extras.get(index, frozenset()) | edge.extras
        if merged != condition.get(index) or more != extras.get(index):
            condition[index], extras[index] = merged, more
            todo.append(index)

    for root in roots:
        reach(root, ALWAYS)
    while todo:
        index = todo.pop()
        for edge in edges(index, extras[index]):
            reach(edge, condition[index])
    return condition


def _version_filter(specs: list[SpecifierSet]) -> Callable[[str], bool]:
    def accepts(version: str) -> bool:
        try:
            parsed = Version(version)
        except InvalidVersion:
            return False
        return any(s.contains(parsed, prereleases=True) for s in specs)
    return accepts


def _exactly(wanted: str) -> Callable[[str], bool]:
    return lambda version: version == wanted


def _pep508_edge(text: str, where: str) -> _Edge:
    try:
        req = Requirement(text)
    except InvalidRequirement as exc:
        raise SourceError(f"{where}: {text!r} is not a requirement ({exc}).", "Fix it.") from None
    # Extras are chosen while walking (builder.pip.extras, a dependency's [extra]).
    marker = marker_without_extra(str(req.marker), where) if req.marker else None
    accepts = _version_filter([req.specifier]) if str(req.specifier) else None
    return _Edge(canonical(req.name), marker, frozenset(canonical(e) for e in req.extras), accepts,
                 text)


def _wheel_names(files: Iterable[tuple[str, str]]) -> tuple[str, ...]:
    names = (PurePosixPath(f.split("?", 1)[0].split("#", 1)[0]).name for f, _ in files)
    return tuple(sorted({n for n in names if n.endswith(".whl")}))


def supports(pins: Iterable[Pin], minor: str) -> bool:
    """Whether every pin that ships compiled CPython wheels has one for ``minor``.

    A lock resolved for a range still pins versions built for some Pythons only; on a
    newer one pip would compile them from source (and fail without a compiler).
    """
    wanted = int(minor.split(".")[1])
    for pin in pins:
        tags = [n[:-4].split("-")[-3:-1] for n in pin.wheels
                if n.count("-") >= 4 and wheel_platform_ok(n)]
        if not tags:
            continue
        ok = False
        for python, abi in tags:
            for tag in python.split("."):
                if tag.startswith("py"):
                    ok = True  # py3 / py2.py3: pure Python
                elif tag.startswith("cp") and tag[2:].isdigit() and tag[2] == "3":
                    built = int(tag[3:]) if len(tag) > 3 else 0
                    ok |= built == wanted or ("abi3" in abi and built <= wanted)
        if not ok:
            return False
    return True


def _keep_hashes(files: Iterable[tuple[str, str]]) -> tuple[str, ...]:
    return tuple(sorted({h for name, h in files if h and (not name or wheel_platform_ok(name))}))


def _is_pypi(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in _PYPI_HOSTS


def _local_dependency(lock: str, name: str, path: str) -> SourceError:
    return SourceError(f"{lock} installs {name} from a local path ({path}), which a generated "
                       "Dockerfile cannot install before the source is copied.",
                       "Publish it to an index or depend on it by git URL, or add a Dockerfile.")


def _check_extras(lock: str, wanted: tuple[str, ...], declared: Iterable[str]) -> None:
    known = {canonical(e) for e in declared}
    missing = [e for e in wanted if canonical(e) not in known]
    if missing:
        raise SourceError(f"builder.pip.extras names {', '.join(missing)}, which the project "
                          f"does not declare (it has: {', '.join(sorted(known)) or 'none'}).",
                          "Use the names of its optional-dependency groups.")


def _stale(lock: str, declared: Iterable[str], locked: Iterable[str]) -> None:
    missing = sorted({canonical(n) for n in declared} - {canonical(n) for n in locked})
    if missing:
        raise SourceError(f"{lock} is out of date: the project depends on {', '.join(missing)}, "
                          "which it does not lock.", "Update the lock with its tool and commit it.")


def _project_dependency_names(project: Project) -> list[str]:
    names = []
    for text in project.table("project").get("dependencies") or []:
        if isinstance(text, str):
            try:
                names.append(Requirement(text).name)
            except InvalidRequirement:
                continue
    return names


# --- uv.lock ------------------------------------------------------------------------------


def read_uv(project: Project, extras: tuple[str, ...]) -> Locked:
    lock = "uv.lock"
    data = project.toml(lock) or {}
    if data.get("version") != 1:
        raise SourceError(f"{lock} has version {data.get('version')!r}; buildq reads version 1.",
                          "Re-lock with a current uv, or add a Dockerfile.")
    packages = [p for p in data.get("package") or [] if isinstance(p, dict)]
    name = project.table("project").get("name")
    root = next((i for i, p in enumerate(packages)
                 if isinstance(p.get("source"), dict)
                 and any(p["source"].get(k) == "." for k in ("virtual", "editable", "directory"))
                 and (not isinstance(name, str) or canonical(p.get("name", "")) == canonical(name))),
                None)
    if root is None:
        raise SourceError(f"{lock} has no entry for the project itself.",
                          "Run `uv lock` in the project and commit uv.lock.")
    by_name: dict[str, list[int]] = {}
    for i, p in enumerate(packages):
        by_name.setdefault(canonical(str(p.get("name", ""))), []).append(i)
    root_pkg = packages[root]
    _check_extras(lock, extras, (root_pkg.get("optional-dependencies") or {}).keys())
    metadata = root_pkg.get("metadata") or {}
    if isinstance(metadata.get("requires-dist"), list):
        _stale(lock, _project_dependency_names(project),
               [str(d.get("name", "")) for d in metadata["requires-dist"] if isinstance(d, dict)])

    def dep_edges(entries: Any, where: str) -> list[_Edge]:
        out = []
        for dep in entries or []:
            if not isinstance(dep, dict) or not isinstance(dep.get("name"), str):
                continue
            version = dep.get("version")
            marker = marker_without_extra(dep["marker"], where) if isinstance(dep.get("marker"), str) \
                else None
            out.append(_Edge(canonical(dep["name"]), marker,
                             frozenset(canonical(e) for e in dep.get("extra") or []),
                             _exactly(version) if isinstance(version, str) else None))
        return out

    def edges(index: int, wanted: frozenset[str]) -> list[_Edge]:
        pkg = packages[index]
        where = f"{lock} {pkg.get('name')}"
        found = dep_edges(pkg.get("dependencies"), where)
        optional = pkg.get("optional-dependencies") or {}
        for extra, entries in sorted(optional.items()):
            if canonical(extra) in wanted:
                found += dep_edges(entries, where)
        return found

    roots = edges(root, frozenset(canonical(e) for e in extras))
    reached = _walk(lock, roots, lambda n: by_name.get(n, []),
                    lambda i: str(packages[i].get("version", "")), edges)
    pins: list[Pin] = []
    indexes: set[str] = set()
    for index, cond in reached.items():
        if index == root:
            continue
        pkg = packages[index]
        pkg_name, version = str(pkg.get("name")), str(pkg.get("version", ""))
        source = pkg.get("source") or {}
        marker = condition_marker(cond)
        files = []
        sdist = pkg.get("sdist")
        if isinstance(sdist, dict):
            files.append((str(sdist.get("url") or sdist.get("path") or ""), str(sdist.get("hash") or "")))
        for wheel in pkg.get("wheels") or []:
            if isinstance(wheel, dict):
                files.append((str(wheel.get("url") or wheel.get("filename") or wheel.get("path") or ""),
                              str(wheel.get("hash") or "")))
        if "registry" in source:
            registry = str(source["registry"])
            if registry.startswith(("http://", "https://")) and not _is_pypi(registry):
                indexes.add(registry)
            elif not registry.startswith(("http://", "https://")):
                raise _local_dependency(lock, pkg_name, registry)
            pins.append(Pin(canonical(pkg_name), f"{pkg_name}=={version}", marker, _keep_hashes(files),
                            wheels=_wheel_names(files)))
        elif "git" in source:
            url = str(source["git"])
            parts = urlsplit(url)
            commit = parts.fragment
            subdirectory = parse_qs(parts.query).get("subdirectory", [""])[0]
            base = parts._replace(query="", fragment="").geturl()
            line = f"{pkg_name} @ git+{base}" + (f"@{commit}" if commit else "")
            if subdirectory:
                line += f"#subdirectory={subdirectory}"
            pins.append(Pin(canonical(pkg_name), line, marker, (), vcs=True))
        elif "url" in source:
            pins.append(Pin(canonical(pkg_name), f"{pkg_name} @ {source['url']}", marker,
                            _keep_hashes(files)))
        else:
            where = next((str(source[k]) for k in ("path", "directory", "editable", "virtual")
                          if k in source), "?")
            raise _local_dependency(lock, pkg_name, where)
    return Locked(lock, tuple(sorted(pins, key=lambda p: (p.name, p.requirement))),
                  tuple(sorted(indexes)))


# --- poetry.lock --------------------------------------------------------------------------


def _poetry_edges(name: str, spec: Any, where: str, wanted: frozenset[str] | None,
                  optional_names: set[str]) -> list[_Edge]:
    """Edges for one Poetry dependency entry (a constraint, a table or a list of tables)."""
    items = spec if isinstance(spec, list) else [spec]
    out = []
    for item in items:
        if isinstance(item, str):
            item = {"version": item}
        if not isinstance(item, dict):
            continue
        if item.get("optional") and canonical(name) not in optional_names:
            continue
        markers = []
        if isinstance(item.get("markers"), str):
            found = marker_without_extra(item["markers"], where)
            if found:
                markers.append(found)
        if isinstance(item.get("python"), str):
            python = specifier_marker(poetry_specifiers(item["python"], where))
            if python:
                markers.append(python)
        if isinstance(item.get("platform"), str):
            markers.append(f'sys_platform == "{item["platform"]}"')
        marker = " and ".join(f"({m})" if " or " in m and len(markers) > 1 else m
                              for m in markers) or None
        accepts = None
        if isinstance(item.get("version"), str):
            accepts = _version_filter(poetry_specifiers(item["version"], f"{where} {name}"))
        extras = frozenset(canonical(e) for e in item.get("extras") or [])
        out.append(_Edge(canonical(name), marker, extras, accepts, f"{name} ({where})"))
    return out


def read_poetry(project: Project, extras: tuple[str, ...]) -> Locked:
    lock = "poetry.lock"
    data = project.toml(lock) or {}
    packages = [p for p in data.get("package") or [] if isinstance(p, dict)]
    legacy_files = (data.get("metadata") or {}).get("files") or {}
    by_name: dict[str, list[int]] = {}
    for i, p in enumerate(packages):
        by_name.setdefault(canonical(str(p.get("name", ""))), []).append(i)
    wanted = frozenset(canonical(e) for e in extras)
    poetry = project.table("tool", "poetry")
    pep621 = project.table("project")
    roots: list[_Edge] = []
    declared: list[str] = []
    # Poetry 2 reads [project]; [tool.poetry.dependencies] may still refine those entries.
    for text in pep621.get("dependencies") or []:
        if isinstance(text, str):
            roots.append(_pep508_edge(text, "pyproject.toml [project] dependencies"))
            declared.append(roots[-1].name)
    optional = pep621.get("optional-dependencies") or {}
    poetry_extras = poetry.get("extras") or {}
    _check_extras(lock, extras, [*optional.keys(), *poetry_extras.keys()])
    for extra, entries in sorted(optional.items()):
        if canonical(extra) in wanted:
            roots += [_pep508_edge(t, f"[project.optional-dependencies] {extra}")
                      for t in entries if isinstance(t, str)]
    chosen_optional = {canonical(n) for extra, names in poetry_extras.items()
                       if canonical(extra) in wanted for n in names or []}
    listed = {e.name for e in roots}
    for dep_name, spec in sorted((poetry.get("dependencies") or {}).items()):
        if canonical(dep_name) == "python" or canonical(dep_name) in listed:
            continue
        found = _poetry_edges(dep_name, spec, "pyproject.toml [tool.poetry.dependencies]", wanted,
                              chosen_optional)
        roots += found
        if not (isinstance(spec, dict) and spec.get("optional")):
            declared.append(dep_name)
    _stale(lock, declared, by_name)

    def edges(index: int, wanted_extras: frozenset[str]) -> list[_Edge]:
        pkg = packages[index]
        where = f"{lock} {pkg.get('name')}"
        chosen = set()
        for extra, names in (pkg.get("extras") or {}).items():
            if canonical(extra) in wanted_extras:
                # "requests (>=2.0)" or "requests>=2.0; marker": the name comes first.
                chosen |= {canonical(m.group(0)) for n in names or []
                           if (m := _LEADING_NAME.match(str(n)))}
        out: list[_Edge] = []
        for dep_name, spec in sorted((pkg.get("dependencies") or {}).items()):
            out += _poetry_edges(dep_name, spec, where, wanted_extras, chosen)
        return out

    reached = _walk(lock, roots, lambda n: by_name.get(n, []),
                    lambda i: str(packages[i].get("version", "")), edges)
    pins: list[Pin] = []
    indexes: set[str] = set()
    for index, cond in reached.items():
        pkg = packages[index]
        pkg_name, version = str(pkg.get("name")), str(pkg.get("version", ""))
        marker = condition_marker(cond)
        raw_files = pkg.get("files") or legacy_files.get(pkg_name) or []
        files = [(str(f.get("file") or f.get("url") or ""), str(f.get("hash") or ""))
                 for f in raw_files if isinstance(f, dict)]
        source = pkg.get("source") or {}
        kind = source.get("type")
        if kind == "git":
            ref = source.get("resolved_reference") or source.get("reference")
            line = f"{pkg_name} @ git+{source.get('url')}" + (f"@{ref}" if ref else "")
            if source.get("subdirectory"):
                line += f"#subdirectory={source['subdirectory']}"
            pins.append(Pin(canonical(pkg_name), line, marker, (), vcs=True))
        elif kind == "url":
            pins.append(Pin(canonical(pkg_name), f"{pkg_name} @ {source.get('url')}", marker,
                            _keep_hashes(files)))
        elif kind in ("file", "directory"):
            raise _local_dependency(lock, pkg_name, str(source.get("url")))
        else:
            if kind == "legacy" and isinstance(source.get("url"), str) and not _is_pypi(source["url"]):
                indexes.add(source["url"])
            pins.append(Pin(canonical(pkg_name), f"{pkg_name}=={version}", marker, _keep_hashes(files),
                            wheels=_wheel_names(files)))
    return Locked(lock, tuple(sorted(pins, key=lambda p: (p.name, p.requirement))),
                  tuple(sorted(indexes)))


# --- pdm.lock -----------------------------------------------------------------------------


def read_pdm(project: Project, extras: tuple[str, ...]) -> Locked:
    lock = "pdm.lock"
    data = project.toml(lock) or {}
    metadata = data.get("metadata") or {}
    packages = [p for p in data.get("package") or [] if isinstance(p, dict)]
    pep621 = project.table("project")
    optional = pep621.get("optional-dependencies") or {}
    _check_extras(lock, extras, optional.keys())
    wanted = frozenset(canonical(e) for e in extras)
    locked_groups = {canonical(str(g)) for g in metadata.get("groups") or []}
    missing = sorted(wanted - locked_groups) if locked_groups else []
    if missing:
        raise SourceError(f"{lock} was locked without the group(s) {', '.join(missing)} that "
                          "builder.pip.extras asks for.", "Run `pdm lock -G :all` and commit pdm.lock.")
    by_name: dict[str, list[int]] = {}
    for i, p in enumerate(packages):
        by_name.setdefault(canonical(str(p.get("name", ""))), []).append(i)
    _stale(lock, _project_dependency_names(project), by_name)
    reached: dict[int, Condition] = {}
    if "inherit_metadata" in (metadata.get("strategy") or []):
        # Each entry says which groups need it and under which marker: nothing to walk.
        for i, pkg in enumerate(packages):
            groups = {canonical(str(g)) for g in pkg.get("groups") or []}
            if groups & ({"default"} | wanted):
                marker = pkg.get("marker")
                cond = extend(ALWAYS, normal_marker(marker, f"{lock} {pkg.get('name')}")
                              if isinstance(marker, str) else None)
                reached[i] = cond
    else:
        roots = [_pep508_edge(t, "pyproject.toml [project] dependencies")
                 for t in pep621.get("dependencies") or [] if isinstance(t, str)]
        for extra, entries in sorted(optional.items()):
            if canonical(extra) in wanted:
                roots += [_pep508_edge(t, f"[project.optional-dependencies] {extra}")
                          for t in entries if isinstance(t, str)]

        def plain(name: str) -> list[int]:
            return [i for i in by_name.get(name, []) if not packages[i].get("extras")]

        def edges(index: int, wanted_extras: frozenset[str]) -> list[_Edge]:
            pkg = packages[index]
            where = f"{lock} {pkg.get('name')}"
            out = [_pep508_edge(t, where) for t in pkg.get("dependencies") or [] if isinstance(t, str)]
            # Extras of a dependency are entries of their own ("name[extra]") in pdm.lock.
            for other in by_name.get(canonical(str(pkg.get("name", ""))), []):
                own = {canonical(e) for e in packages[other].get("extras") or []}
                if own and own <= wanted_extras and other != index:
                    out += [_pep508_edge(t, where) for t in packages[other].get("dependencies") or []
                            if isinstance(t, str)]
            return out

        reached = _walk(lock, roots, plain, lambda i: str(packages[i].get("version", "")), edges)
    pins: dict[tuple[str, str], Pin] = {}
    conditions: dict[tuple[str, str], Condition] = {}
    for index, cond in reached.items():
        pkg = packages[index]
        pkg_name, version = str(pkg.get("name")), str(pkg.get("version", ""))
        files = [(str(f.get("file") or f.get("url") or ""), str(f.get("hash") or ""))
                 for f in pkg.get("files") or [] if isinstance(f, dict)]
        if "git" in pkg:
            ref = pkg.get("revision") or pkg.get("ref")
            line = f"{pkg_name} @ git+{pkg['git']}" + (f"@{ref}" if ref else "")
            if pkg.get("subdirectory"):
                line += f"#subdirectory={pkg['subdirectory']}"
            pin = Pin(canonical(pkg_name), line, None, (), vcs=True)
        elif "url" in pkg:
            pin = Pin(canonical(pkg_name), f"{pkg_name} @ {pkg['url']}", None, _keep_hashes(files))
        elif "path" in pkg or "editable" in pkg:
            path = str(pkg.get("path") or pkg.get("editable"))
            if path.strip("./") == "":
                continue  # the project itself: installed with its source
            raise _local_dependency(lock, pkg_name, path)
        else:
            pin = Pin(canonical(pkg_name), f"{pkg_name}=={version}", None, _keep_hashes(files),
                      wheels=_wheel_names(files))
        key = (pin.name, pin.requirement)
        conditions[key] = union(conditions.get(key, frozenset()), cond)
        old = pins.get(key)
        hashes = tuple(sorted(set(pin.hashes) | set(old.hashes if old else ())))
        pins[key] = Pin(pin.name, pin.requirement, None, hashes, pin.vcs, pin.wheels)
    for source in metadata.get("sources") or project.table("tool", "pdm").get("source") or []:
        if isinstance(source, dict) and isinstance(source.get("url"), str) and not _is_pypi(source["url"]):
            raise SourceError(f"the project installs from the package index {source['url']} "
                              "([tool.pdm.source]), which generated Dockerfiles do not read.",
                              "Set builder.pip.index-url / extra-index-urls to it.")
    out = [Pin(p.name, p.requirement, condition_marker(conditions[k]), p.hashes, p.vcs, p.wheels)
           for k, p in pins.items()]
    return Locked(lock, tuple(sorted(out, key=lambda p: (p.name, p.requirement))))


# --- Pipfile.lock -------------------------------------------------------------------------


def read_pipfile_lock(project: Project) -> tuple[Locked, bool]:
    """The lock's default packages, and whether it installs the project itself (path ".")."""
    lock = "Pipfile.lock"
    data = project.json(lock)
    if not isinstance(data, dict) or not isinstance(data.get("default", {}), dict):
        raise SourceError(f"{lock} is not a Pipfile lock (no \"default\" section).",
                          "Run `pipenv lock` and commit Pipfile.lock.")
    meta = data.get("_meta") or {}
    sources = {str(s.get("name")): str(s.get("url")) for s in meta.get("sources") or []
               if isinstance(s, dict)}
    pipfile = project.toml("Pipfile") or {}
    _stale(lock, [n for n, spec in (pipfile.get("packages") or {}).items()
                  if not (isinstance(spec, dict) and (spec.get("path") or spec.get("editable")))],
           data.get("default", {}).keys())
    pins: list[Pin] = []
    indexes: set[str] = set()
    itself = False
    for name, spec in sorted((data.get("default") or {}).items()):
        if not isinstance(spec, dict):
            continue
        where = f"{lock} {name}"
        marker = normal_marker(spec["markers"], where) if isinstance(spec.get("markers"), str) else None
        extras = spec.get("extras") or []
        head = name + (f"[{','.join(sorted(extras))}]" if extras else "")
        hashes = tuple(sorted(str(h) for h in spec.get("hashes") or []))
        if "git" in spec:
            ref = spec.get("ref")
            line = f"{head} @ git+{spec['git']}" + (f"@{ref}" if ref else "")
            if spec.get("subdirectory"):
                line += f"#subdirectory={spec['subdirectory']}"
            pins.append(Pin(canonical(name), line, marker, (), vcs=True))
        elif "file" in spec:
            pins.append(Pin(canonical(name), f"{head} @ {spec['file']}", marker, hashes))
        elif "path" in spec:
            if str(spec["path"]).strip("./") == "":
                itself = True
                continue
            raise _local_dependency(lock, name, str(spec["path"]))
        else:
            version = str(spec.get("version", ""))
            if not version.startswith("=="):
                raise SourceError(f"{where} is not pinned (version {version!r}).",
                                  "Run `pipenv lock` and commit Pipfile.lock.")
            index = spec.get("index")
            if isinstance(index, str) and index in sources and not _is_pypi(sources[index]):
                indexes.add(sources[index])
            pins.append(Pin(canonical(name), f"{head}{version}", marker, hashes))
    return Locked(lock, tuple(pins), tuple(sorted(indexes))), itself
