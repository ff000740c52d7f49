"""Which packaging style a project uses, and how its dependencies get into the image.

In order: a lockfile (uv.lock, poetry.lock, pdm.lock, Pipfile.lock; installed exactly);
``requirements.txt``; a ``Pipfile``; ``pyproject.toml`` (PEP 621, Poetry 1.x and 2.x,
PDM, Hatch, uv, setuptools, flit); ``setup.py``; ``setup.cfg``. Whatever can be known
before the source is copied goes in the dependency layer; the project itself is
installed after the source, without its dependencies when they are already in.
"""

from __future__ import annotations

import ast
import configparser
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement

from config.errors import SourceError
from workers.dockerfile.constraints import normal_marker, poetry_requirement
from workers.dockerfile.locks import (
    LOCKFILES,
    Locked,
    Pin,
    read_pdm,
    read_pipfile_lock,
    read_poetry,
    read_uv,
)
from workers.dockerfile.project import Project, canonical

# pip options inside a requirements file that name another file pip will read.
_INCLUDE_RE = re.compile(r"^(?:-r|-c|--requirement|--constraint)(?:\s*=\s*|\s+|(?=[^\s-]))(\S+)")
_LOCAL_REQ_RE = re.compile(r"^(?:-e|--editable)\b|^(?:\.{1,2}(?:/|$)|/|file:)")
# The project itself, as requirements files name it ("." or "-e .").
_ITSELF_RE = re.compile(r"^(?:(?:-e|--editable)\s+)?\.(?:/)?(\[[^\]]*\])?$")
_EGG_RE = re.compile(r"#egg=([A-Za-z0-9][A-Za-z0-9._-]*)")
_VCS_RE = re.compile(r"\b(?:git|hg|svn|bzr)\+")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*")
# "name @ file:///home/me/..." as pip freeze writes packages installed from local files.
_FILE_URL_RE = re.compile(r"(?<=@)\s*file:/*[^/\s]*")


@dataclass(frozen=True)
class Dependencies:
    """How the dependency layer is made, and what the record and comments say of it."""

    style: str
    #: "locked" (a lock's exact pins), "resolved" (pip resolves at build time) or "none".
    mode: str
    lock: str | None
    note: str
    #: Files copied into the image before the install (requirement files and includes).
    copy: tuple[str, ...] = ()
    #: A requirement file pip reads (one of ``copy``), and whether exactly (``--no-deps``).
    requirement_file: str | None = None
    file_no_deps: bool = False
    #: Requirement lines written into the Dockerfile (a lock's pins, or Pipfile/pyproject
    #: requirements), and the file name they are written to in the image.
    pins: tuple[Pin, ...] = ()
    pins_file: str = "/tmp/buildq-requirements.txt"
    locked_pins: bool = False
    #: Package indexes besides the configured one that the pins come from.
    indexes: tuple[str, ...] = ()
    #: After the source: None, "no-deps" (dependencies already in) or "with-deps".
    install_project: str | None = None
    #: What pip installs then: the project, with the extras a requirements file gave it.
    project_target: str = "."
    #: Canonical names of the dependencies known before the build (to find the server).
    names: frozenset[str] = frozenset()
    #: Dependencies installed from git (the image needs git for them).
    git_for: tuple[str, ...] = ()


def _requirement_name(line: str) -> str | None:
    egg = _EGG_RE.search(line)
    if egg:
        return canonical(egg.group(1))
    try:
        return canonical(Requirement(line).name)
    except InvalidRequirement:
        match = _NAME_RE.match(line)
        return canonical(match.group(0)) if match and not line.startswith("-") else None


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Lines with continuations joined and comments dropped, with their first line number."""
    out: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        if not pending:
            start = number
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = (pending + raw)
        pending = ""
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            out.append((start, line))
    if pending.strip():
        out.append((start, pending.strip()))
    return out


@dataclass
class _RequirementFiles:
    files: list[str]
    names: set[str]
    git: set[str]
    itself: str | None
    hashed: bool
    pinned: bool
    top_lines: list[str]


def read_requirement_files(project: Project, first: str) -> _RequirementFiles:
    """``first`` and every file it includes with -r/-c, read and checked."""
    found = _RequirementFiles([], set(), set(), None, True, True, [])
    todo = [(first, False)]
    requirements = 0
    while todo:
        rel, constraints = todo.pop(0)
        if rel in found.files:
            continue
        text = project.text(rel)
        if text is None:
            raise SourceError(f"{found.files[-1] if found.files else first!r} includes {rel!r}, which "
                              "is not in the project.", "Add the file or remove the -r/-c line.")
        found.files.append(rel)
        for number, line in _logical_lines(text):
            itself = _ITSELF_RE.match(line) if rel == first else None
            if itself:
                # Installed with the source (and so dropped from the dependency layer).
                found.itself = "." + (itself.group(1) or "")
                continue
            if rel == first:
                found.top_lines.append(line)
            local = _FILE_URL_RE.search(line)
            if local:
                raise SourceError(
                    f"{rel} line {number} installs {_requirement_name(line) or line!r} from "
                    f"{local.group(0).strip()}..., a file on the machine that wrote it, which no build can "
                    "reach.", "Pin it by version (name==x.y) or by git URL, or add a Dockerfile.")
            if _LOCAL_REQ_RE.match(line) and not _VCS_RE.search(line):
                # The dependency layer is built before the source is copied.
                raise SourceError(
                    f"{rel} line {number} installs from the project's files ({line!r}), which "
                    "the generated Dockerfile cannot do before copying the source.",
                    "Depend on it by name or git URL, or add a Dockerfile.")
            match = _INCLUDE_RE.match(line)
            if match:
                target = PurePosixPath(rel).parent / match.group(1)
                parts = [p for p in target.parts if p not in ("", ".")]
                if target.is_absolute() or ".." in parts:
                    raise SourceError(f"{rel} line {number} includes {match.group(1)!r} from "
                                      "outside the project.", "Keep requirement files inside it.")
                # A constraint file (and what it includes) limits versions and needs no hashes.
                todo.append(("/".join(parts), constraints or line.startswith(("-c", "--constraint"))))
                continue
            if line.startswith("-") and not line.startswith(("-e", "--editable")):
                continue  # an option line (--index-url, --hash on its own, --pre, ...)
            requirement = line.split(" --", 1)[0].strip()
            name = _requirement_name(requirement.removeprefix("-e ").removeprefix("--editable ").strip())
            if constraints:
                continue
            if name:
                found.names.add(name)
            if _VCS_RE.search(line):
                found.git.add(name or requirement)
            requirements += 1
            found.hashed &= "--hash" in line
            found.pinned &= bool(re.search(r"===?\s*[\w.!+*-]+", requirement)) and "*" not in requirement
    if not requirements:
        found.hashed = found.pinned = False
    return found


def _requirements_txt(project: Project, rel: str, extras: tuple[str, ...]) -> Dependencies:
    if extras:
        raise SourceError(f"builder.pip.extras is set, but the dependencies come from {rel}, "
                          "which has no optional groups.", "Remove builder.pip.extras.")
    files = read_requirement_files(project, rel)
    locked = files.hashed and files.pinned
    mode = "locked" if locked else "resolved"
    note = f"from {rel}" + (" (every requirement pinned with hashes)" if locked else "")
    names, git = frozenset(files.names), tuple(sorted(files.git))
    if files.itself:
        # The project line can only be installed with the source: the rest of the file is
        # written into the image without it, beside the files it includes.
        pins = tuple(Pin("", line) for line in files.top_lines)
        return Dependencies("requirements.txt", mode, rel if locked else None,
                            note + ", the project itself after the source",
                            copy=tuple(files.files[1:]), pins=pins, pins_file=f"/app/.buildq-{rel}",
                            install_project="with-deps", project_target=files.itself,
                            names=names, git_for=git)
    return Dependencies("requirements.txt", mode, rel if locked else None, note,
                        copy=tuple(files.files), requirement_file=rel, names=names, git_for=git)


def _from_locked(style: str, found: Locked, install: str | None, names: set[str]) -> Dependencies:
    hashed = bool(found.pins) and all(p.hashes for p in found.pins if not p.vcs)
    note = f"locked by {found.lock}: {len(found.pins)} pins" + (" with hashes" if hashed else "")
    return Dependencies(style=style, mode="locked", lock=found.lock, note=note, pins=found.pins,
                        locked_pins=True, indexes=found.indexes, install_project=install,
                        names=frozenset(names | {p.name for p in found.pins}),
                        git_for=tuple(sorted(p.name for p in found.pins if p.vcs)))


def _build_system(project: Project) -> bool:
    return bool(project.table("build-system")) or project.is_file("setup.py")


def _pyproject_installable(project: Project, tool: str) -> bool:
    """Whether the project is a package pip can install (not an app run from its source)."""
    if tool == "poetry" and project.table("tool", "poetry").get("package-mode") is False:
        return False
    if tool == "pdm" and project.table("tool", "pdm").get("distribution") is False:
        return False
    if tool == "uv" and project.table("tool", "uv").get("package") is False:
        return False
    return _build_system(project)


def pyproject_tool(project: Project) -> str | None:
    """The tool a pyproject.toml is written for, as far as it says."""
    tool = project.table("tool")
    backend = str(project.table("build-system").get("build-backend") or "")
    for name, module in (("poetry", "poetry"), ("pdm", "pdm"), ("hatch", "hatchling"),
                         ("flit", "flit_core"), ("uv", "uv_build")):
        if name in tool or backend.startswith(module):
            return name
    if "setuptools" in backend or "setuptools" in tool:
        return "setuptools"
    return None


def _choose_lock(project: Project) -> tuple[str, str] | None:
    present = [(rel, tool) for rel, tool in LOCKFILES if project.is_file(rel)]
    if len(present) <= 1:
        return present[0] if present else None
    # Several locks: the one of the tool pyproject.toml (or a Pipfile) is written for.
    tool = pyproject_tool(project)
    matching = [(rel, t) for rel, t in present if t == tool
                or (t == "pipenv" and tool is None and project.is_file("Pipfile"))]
    if len(matching) == 1:
        return matching[0]
    raise SourceError(f"the project has several lockfiles ({', '.join(r for r, _ in present)}) and "
                      "buildq cannot tell which one is current.",
                      "Delete the stale ones, or add a Dockerfile.")


def _pep621(project: Project, extras: tuple[str, ...]) -> tuple[list[str] | None, list[str]]:
    """Static ``[project]`` dependencies plus the chosen extras' (None: dynamic), and all extras."""
    table = project.table("project")
    optional = table.get("optional-dependencies") or {}
    if not isinstance(optional, dict):
        raise SourceError("pyproject.toml [project.optional-dependencies] is not a table.", "Fix it.")
    dynamic = table.get("dynamic") or []
    if "dependencies" in dynamic or (extras and "optional-dependencies" in dynamic):
        return None, sorted(optional)
    deps = table.get("dependencies", [])
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise SourceError("pyproject.toml [project] dependencies is not a list of strings.",
                          "Fix it, or add a Dockerfile.")
    chosen = list(deps)
    known = {canonical(k): k for k in optional}
    for extra in extras:
        if canonical(extra) not in known:
            raise SourceError(f"builder.pip.extras names {extra}, which pyproject.toml does not "
                              f"declare (it has: {', '.join(sorted(optional)) or 'none'}).",
                              "Use the names of its [project.optional-dependencies].")
        chosen += [d for d in optional[known[canonical(extra)]] if isinstance(d, str)]
    return chosen, sorted(optional)


def _poetry1(project: Project, extras: tuple[str, ...]) -> list[str]:
    poetry = project.table("tool", "poetry")
    declared = poetry.get("extras") or {}
    known = {canonical(k): k for k in declared}
    wanted: set[str] = set()
    for extra in extras:
        if canonical(extra) not in known:
            raise SourceError(f"builder.pip.extras names {extra}, which [tool.poetry.extras] does "
                              "not declare.", "Use the names of its [tool.poetry.extras].")
        wanted |= {canonical(n) for n in declared[known[canonical(extra)]] or []}
    out = []
    for name, spec in sorted((poetry.get("dependencies") or {}).items()):
        if canonical(name) == "python":
            continue
        line, optional = poetry_requirement(name, spec, "pyproject.toml [tool.poetry.dependencies]")
        if optional and canonical(name) not in wanted:
            continue
        out.append(line)
    return out


def _resolved(style: str, note: str, lines: list[str], install: str | None,
              names: set[str] | None = None) -> Dependencies:
    cleaned = sorted({line.strip() for line in lines if line.strip()})
    pins = tuple(Pin(_requirement_name(line) or "", line) for line in cleaned)
    git = tuple(sorted(p.name or p.requirement for p in pins if _VCS_RE.search(p.requirement)))
    all_names = {p.name for p in pins if p.name} | (names or set())
    return Dependencies(style=style, mode="resolved" if pins or install == "with-deps" else "none",
                        lock=None, note=note, pins=pins, install_project=install,
                        names=frozenset(all_names), git_for=git)


def _pipfile(project: Project, extras: tuple[str, ...]) -> Dependencies:
    if extras:
        raise SourceError("builder.pip.extras is set, but a Pipfile has no optional groups.",
                          "Remove builder.pip.extras.")
    pipfile = project.toml("Pipfile") or {}
    lines: list[str] = []
    install: str | None = None
    for name, spec in sorted((pipfile.get("packages") or {}).items()):
        where = f"Pipfile [packages] {name}"
        if isinstance(spec, str):
            spec = {"version": spec}
        if not isinstance(spec, dict):
            raise SourceError(f"{where} is not a version or a table.", "Fix the Pipfile.")
        extras_ = spec.get("extras") or []
        head = name + (f"[{','.join(sorted(extras_))}]" if extras_ else "")
        markers = [normal_marker(spec["markers"], where)] if isinstance(spec.get("markers"), str) else []
        for key in ("os_name", "sys_platform", "platform_machine", "platform_system"):
            if isinstance(spec.get(key), str):
                markers.append(f"{key} {spec[key]}" if spec[key][:1] in "=!<>" else
                               f'{key} == "{spec[key]}"')
        if "path" in spec or ("editable" in spec and "git" not in spec):
            path = str(spec.get("path", ""))
            if path.strip("./") == "":
                install = "with-deps"
                continue
            raise SourceError(f"{where} is a local path ({path}), which a generated Dockerfile "
                              "cannot install before the source is copied.",
                              "Publish it to an index, or add a Dockerfile.")
        if "git" in spec:
            ref = spec.get("ref")
            line = f"{head} @ git+{spec['git']}" + (f"@{ref}" if ref else "")
        elif "file" in spec:
            line = f"{head} @ {spec['file']}"
        else:
            version = str(spec.get("version", "*")).strip()
            line = head + ("" if version in ("", "*") else version)
        if markers:
            line += " ; " + " and ".join(markers)
        lines.append(line)
    return _resolved("pipenv", "from the Pipfile (no Pipfile.lock)", lines, install)


# --- setup.py and setup.cfg ---------------------------------------------------------------


def _literal_strings(node: ast.AST | None, names: dict[str, ast.AST]) -> list[str] | None:
    if isinstance(node, ast.Name) and node.id in names:
        node = names[node.id]
    if isinstance(node, ast.List | ast.Tuple) and all(
            isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
        return [e.value for e in node.elts]  # type: ignore[attr-defined]
    return None


def setup_py_call(project: Project) -> tuple[ast.Call, dict[str, ast.AST]] | None:
    """The ``setup(...)`` call of setup.py and the module-level names bound to literals."""
    text = project.text("setup.py")
    if text is None:
        return None
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    names: dict[str, ast.AST] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            names[stmt.targets[0].id] = stmt.value
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if (func.id if isinstance(func, ast.Name) else
                    func.attr if isinstance(func, ast.Attribute) else "") == "setup":
                return node, names
    return None


def _setup_py(project: Project, extras: tuple[str, ...]) -> Dependencies:
    found = setup_py_call(project)
    deps: list[str] | None = None
    if found is not None:
        call, names = found
        keywords = {k.arg: k.value for k in call.keywords if k.arg}
        if "install_requires" not in keywords:
            deps = [] if not any(k.arg is None for k in call.keywords) else None
        else:
            deps = _literal_strings(keywords["install_requires"], names)
        if deps is not None and extras:
            table: ast.AST | None = keywords.get("extras_require")
            if isinstance(table, ast.Name) and table.id in names:
                table = names[table.id]
            declared: dict[str, list[str] | None] = {}
            if isinstance(table, ast.Dict):
                for key, value in zip(table.keys, table.values, strict=True):
                    if isinstance(key, ast.Constant) and isinstance(key.value, str):
                        declared[canonical(key.value)] = _literal_strings(value, names)
            for extra in extras:
                if canonical(extra) not in declared:
                    raise SourceError(f"builder.pip.extras names {extra}, which setup.py's "
                                      "extras_require does not declare (statically).",
                                      "Use the names of its extras_require.")
                more = declared[canonical(extra)]
                if more is None:
                    deps = None
                    break
                deps += more
    if deps is None:
        return _resolved("setup.py", "install_requires is computed by setup.py, so the "
                         "dependencies are installed with the project after the source", [],
                         "with-deps")
    return _resolved("setup.py", "from setup.py install_requires", deps, "no-deps")


def setup_cfg(project: Project) -> configparser.ConfigParser | None:
    text = project.text("setup.cfg")
    if text is None:
        return None
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text)
    except configparser.Error as exc:
        raise SourceError(f"setup.cfg cannot be read ({exc}).", "Fix it, or add a Dockerfile.") from None
    return parser


def _cfg_list(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _setup_cfg(project: Project, extras: tuple[str, ...]) -> Dependencies:
    parser = setup_cfg(project)
    assert parser is not None
    if not _build_system(project):
        raise SourceError("the project declares itself in setup.cfg but has neither setup.py nor "
                          "pyproject.toml, so pip cannot install it.",
                          "Add a pyproject.toml with [build-system] requires = [\"setuptools\"] and "
                          "build-backend = \"setuptools.build_meta\", or add a Dockerfile.")
    deps = _cfg_list(parser.get("options", "install_requires", fallback=""))
    declared = {canonical(k): k for k in (parser["options.extras_require"]
                                          if parser.has_section("options.extras_require") else {})}
    for extra in extras:
        if canonical(extra) not in declared:
            raise SourceError(f"builder.pip.extras names {extra}, which setup.cfg "
                              "[options.extras_require] does not declare.",
                              "Use the names of its extras_require.")
        deps += _cfg_list(parser.get("options.extras_require", declared[canonical(extra)]))
    return _resolved("setup.cfg", "from setup.cfg install_requires", deps, "no-deps")


# --- choosing -----------------------------------------------------------------------------


def detect_dependencies(project: Project, extras: tuple[str, ...]) -> Dependencies:
    """The dependency plan for the project, in the documented order."""
    tool = pyproject_tool(project)
    lock = _choose_lock(project)
    if lock is not None:
        rel, lock_tool = lock
        install = "no-deps" if _pyproject_installable(project, lock_tool) else None
        if lock_tool == "uv":
            data = project.toml(rel) or {}
            # uv installs the project only when it is a package ("editable"), not "virtual".
            packaged = any(isinstance(p, dict) and (p.get("source") or {}).get("editable") == "."
                           for p in data.get("package") or [])
            return _from_locked("uv", read_uv(project, extras), install if packaged else None, set())
        if lock_tool == "poetry":
            return _from_locked("poetry", read_poetry(project, extras), install, set())
        if lock_tool == "pdm":
            return _from_locked("pdm", read_pdm(project, extras), install, set())
        if extras:
            raise SourceError("builder.pip.extras is set, but a Pipfile.lock has no optional groups.",
                              "Remove builder.pip.extras.")
        pipenv, itself = read_pipfile_lock(project)
        return _from_locked("pipenv", pipenv, "no-deps" if itself and _build_system(project) else None,
                            set())
    if project.is_file("requirements.txt"):
        # As Heroku does: the requirements are the environment, and the project runs from its
        # source unless the file names it ("-e .").
        return _requirements_txt(project, "requirements.txt", extras)
    if project.is_file("Pipfile"):
        return _pipfile(project, extras)
    pyproject = project.pyproject
    if "project" in pyproject or "poetry" in project.table("tool") or "build-system" in pyproject:
        install = "no-deps" if _pyproject_installable(project, tool or "") else None
        style = tool or "pyproject.toml"
        table = project.table("project")
        if "dependencies" not in table and "dependencies" not in (table.get("dynamic") or []) \
                and project.table("tool", "poetry", "dependencies"):
            return _resolved("poetry", "from [tool.poetry.dependencies] (no poetry.lock)",
                             _poetry1(project, extras), install)
        if not table and project.is_file("setup.py"):
            return _setup_py(project, extras)
        if not table and project.is_file("setup.cfg"):
            return _setup_cfg(project, extras)
        deps, _ = _pep621(project, extras)
        if deps is None:
            # Only the build backend knows them (pip's default is setuptools when
            # [build-system] is missing).
            return _resolved(style, "pyproject.toml's dependencies are dynamic, so they are "
                             "installed with the project after the source", [], "with-deps")
        return _resolved(style, "from pyproject.toml [project] dependencies"
                         + (f" and extras {', '.join(extras)}" if extras else ""), deps, install)
    if project.is_file("setup.py"):
        return _setup_py(project, extras)
    if project.is_file("setup.cfg"):
        return _setup_cfg(project, extras)
    if extras:
        raise SourceError("builder.pip.extras is set, but the project declares no dependencies.",
                          "Remove builder.pip.extras.")
    return Dependencies(style="none", mode="none", lock=None,
                        note="none (no lockfile, requirements.txt, Pipfile, pyproject.toml or setup.py)")


def entry_scripts(project: Project) -> list[str]:
    """Console scripts the installed project provides, sorted."""
    names: set[str] = set()
    scripts = project.table("project").get("scripts")
    if isinstance(scripts, dict):
        names |= set(scripts)
    poetry = project.table("tool", "poetry").get("scripts")
    if isinstance(poetry, dict):
        names |= {n for n, v in poetry.items()
                  if isinstance(v, str) or (isinstance(v, dict) and v.get("type", "console") == "console")}
    parser = setup_cfg(project)
    if parser is not None and parser.has_option("options.entry_points", "console_scripts"):
        for line in parser.get("options.entry_points", "console_scripts").splitlines():
            if "=" in line:
                names.add(line.split("=", 1)[0].strip())
    found = setup_py_call(project)
    if found is not None:
        call, literals = found
        for keyword in call.keywords:
            if keyword.arg != "entry_points":
                continue
            value: Any = keyword.value
            if isinstance(value, ast.Name) and value.id in literals:
                value = literals[value.id]
            if isinstance(value, ast.Dict):
                for key, item in zip(value.keys, value.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value == "console_scripts":
                        for entry in _literal_strings(item, literals) or []:
                            names.add(entry.split("=", 1)[0].strip())
    return sorted(n for n in names if n)
