"""How the image starts: the command a project means, or a refusal naming what to add.

In order: ``--entrypoint`` / ``builder.entrypoint``; a W&B job's entrypoint; the
``Procfile``'s ``web`` process (else its only one); a single console script of the
installed project; Django's ``manage.py`` served by gunicorn or uvicorn; an ASGI/WSGI
``app`` in ``main.py``/``app.py`` with a server among the dependencies; ``python -m
<package>`` for a package with ``__main__.py``; a lone ``main.py``/``train.py``/``app.py``.
Servers listen on ``0.0.0.0:$PORT`` (``PORT`` defaults to :data:`WEB_PORT`).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

from config.errors import SourceError
from workers.dockerfile.job import JOB_FILE, Job
from workers.dockerfile.project import Project
from workers.dockerfile.styles import Dependencies, entry_scripts

#: The port web processes listen on unless ``PORT`` says otherwise (as on Heroku).
WEB_PORT = 8080
#: Scripts tried, in this order, when nothing else says how to start.
ENTRY_SCRIPTS = ("main.py", "train.py", "app.py")
#: Modules an ``app`` object is looked for in.
APP_MODULES = ("main.py", "app.py")

_PROCESS_RE = re.compile(r"^([A-Za-z0-9_-]+)\s*:\s*(.+)$")
_PYTHON_RE = re.compile(r"^(?:.*/)?python(?:\d+(?:\.\d+)?)?$")
_SETTINGS_RE = re.compile(r"DJANGO_SETTINGS_MODULE['\"]\s*,\s*['\"]([A-Za-z_][\w.]*)['\"]")
_SHELL_SYNTAX = re.compile(r"[;&|<>`]|\$\(")
_ASGI_FACTORIES = {"FastAPI", "Starlette", "Quart", "Litestar", "get_asgi_application"}
_WSGI_FACTORIES = {"Flask", "Bottle", "get_wsgi_application", "make_wsgi_app", "Pyramid"}
_CLI_FACTORIES = {"Typer", "group", "command", "Group", "Command"}


@dataclass(frozen=True)
class Start:
    #: CMD (exec form); with an ENTRYPOINT, the default arguments.
    cmd: tuple[str, ...]
    #: ENTRYPOINT: only for a console script, so ``docker run IMAGE --help`` reaches it.
    entrypoint: tuple[str, ...] | None = None
    #: A server listening on $PORT (the image gets PORT and EXPOSE).
    web: bool = False
    source: str = ""


def shell(command: str) -> tuple[str, ...]:
    """A shell command line as CMD: ``sh -c``, exec'ing a simple command so it gets signals."""
    command = command.strip()
    if not _SHELL_SYNTAX.search(command) and not command.startswith("exec "):
        command = f"exec {command}"
    return ("sh", "-c", command)


def _procfile(project: Project) -> Start | None:
    text = project.text("Procfile")
    if text is None:
        return None
    processes: dict[str, str] = {}
    for line in text.splitlines():
        match = _PROCESS_RE.match(line.strip())
        if match and not line.lstrip().startswith("#"):
            processes[match.group(1)] = match.group(2).strip()
    if "web" in processes:
        return Start(shell(processes["web"]), web=True, source="the Procfile's web process")
    runnable = {k: v for k, v in processes.items() if k != "release"}
    if len(runnable) == 1:
        name, command = next(iter(runnable.items()))
        return Start(shell(command), source=f"the Procfile's only process ({name})")
    if not runnable:
        raise SourceError("the Procfile names no process.", "Add a line like \"web: gunicorn app:app\".")
    raise SourceError(f"the Procfile has several processes ({', '.join(sorted(runnable))}) and no "
                      "web process, and buildq cannot tell which one the image runs.",
                      "Name the one to run \"web\", or pass --entrypoint.")


def _django(project: Project, names: frozenset[str]) -> Start | None:
    text = project.text("manage.py")
    if text is None:
        return None
    match = _SETTINGS_RE.search(text)
    if match is None:
        return None
    parts = match.group(1).split(".")
    module = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)
                   if project.is_file("/".join(parts[:i]) + "/wsgi.py")
                   or project.is_file("/".join(parts[:i]) + "/asgi.py")), None)
    if module is None:
        return None
    path = module.replace(".", "/")
    if "gunicorn" in names and project.is_file(f"{path}/wsgi.py"):
        command = f"gunicorn {module}.wsgi --bind 0.0.0.0:$PORT"
    elif "uvicorn" in names and project.is_file(f"{path}/asgi.py"):
        command = f"uvicorn {module}.asgi:application --host 0.0.0.0 --port $PORT"
    else:
        raise SourceError("the project is a Django site (manage.py), but neither gunicorn nor "
                          "uvicorn is among its dependencies, and manage.py runserver is not a "
                          "production server.",
                          "Add gunicorn to the dependencies, or a Procfile with a web process.")
    return Start(shell(command), web=True, source=f"Django ({module})")


def _callee(node: ast.AST) -> str:
    if isinstance(node, ast.Call):
        return _callee(node.func)
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _callee(node.value)
        # falcon.asgi.App is ASGI, falcon.App WSGI.
        if node.attr == "App" and inner:
            return "falcon.asgi.App" if inner.endswith("asgi") else "falcon.App"
        return node.attr
    return ""


def app_kind(project: Project, rel: str) -> tuple[str, str] | None:
    """The web app a module defines at top level: its name and "asgi", "wsgi", "cli" or "unknown"."""
    text = project.text(rel)
    if text is None:
        return None
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign | ast.AnnAssign):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            named = [t.id for t in targets if isinstance(t, ast.Name) and t.id in ("app", "application")]
            if not named or stmt.value is None:
                continue
            callee = _callee(stmt.value)
            if callee in _ASGI_FACTORIES or callee == "falcon.asgi.App":
                return named[0], "asgi"
            if callee in _WSGI_FACTORIES or callee == "falcon.App":
                return named[0], "wsgi"
            if callee in _CLI_FACTORIES:
                return named[0], "cli"
            return named[0], "unknown"
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef) and stmt.name in ("app", "application"):
            count = len(stmt.args.args)
            if isinstance(stmt, ast.AsyncFunctionDef) and count == 3:
                return stmt.name, "asgi"
            if isinstance(stmt, ast.FunctionDef) and count == 2:
                return stmt.name, "wsgi"
    return None


def _web_app(project: Project, names: frozenset[str]) -> Start | None:
    found = []
    for rel in APP_MODULES:
        app = app_kind(project, rel)
        if app is not None and app[1] != "cli":
            found.append((rel, *app))
    servers = {"gunicorn", "uvicorn", "hypercorn", "waitress"} & names
    # An object of unknown kind is a web app only if a server is there to serve it.
    found = [f for f in found if f[2] != "unknown" or servers]
    if not found:
        return None
    if len(found) > 1:
        raise SourceError(f"both {found[0][0]} and {found[1][0]} define an app, and buildq cannot "
                          "tell which one the image serves.",
                          "Add a Procfile (web: ...) or pass --entrypoint.")
    rel, name, kind = found[0]
    target = f"{rel.removesuffix('.py')}:{name}"
    if kind == "unknown":
        if servers == {"gunicorn"}:
            kind = "wsgi"
        elif servers <= {"uvicorn", "hypercorn"}:
            kind = "asgi"
        else:
            raise SourceError(f"{rel} defines {name!r}, but buildq cannot tell whether it is an ASGI "
                              "or a WSGI app to pick a server for it.",
                              "Add a Procfile (web: ...) or pass --entrypoint.")
    command: str | None = None
    if kind == "asgi":
        if "uvicorn" in names:
            command = f"uvicorn {target} --host 0.0.0.0 --port $PORT"
        elif "hypercorn" in names:
            command = f"hypercorn {target} --bind 0.0.0.0:$PORT"
        server_hint = "uvicorn"
    else:
        if "gunicorn" in names:
            command = f"gunicorn {target} --bind 0.0.0.0:$PORT"
        elif "uvicorn" in names:
            command = f"uvicorn {target} --interface wsgi --host 0.0.0.0 --port $PORT"
        elif "waitress" in names:
            command = f"waitress-serve --listen=0.0.0.0:$PORT {target}"
        server_hint = "gunicorn"
    if command is None:
        raise SourceError(f"{rel} defines an {kind.upper()} app ({name}), but no server for it is "
                          f"among the dependencies, and running {rel} directly would serve on "
                          "127.0.0.1 only (a development server).",
                          f"Add {server_hint} to the dependencies, or a Procfile with a web process.")
    return Start(shell(command), web=True, source=f"the {kind.upper()} app in {rel}")


def _dunder_main(project: Project, installed: bool) -> Start | None:
    packages = [d for d in project.listdir() if not d.startswith(".")
                and project.is_file(f"{d}/__main__.py")]
    if installed:
        packages += [d for d in project.listdir("src") if project.is_file(f"src/{d}/__main__.py")]
    packages = [p for p in packages if p.isidentifier() and p not in ("tests", "test")]
    if len(packages) != 1:
        return None
    return Start(("python", "-m", packages[0]), source=f"{packages[0]}/__main__.py")


def _job(project: Project, job: Job) -> Start:
    assert job.entrypoint is not None
    argv = list(job.entrypoint)
    if _PYTHON_RE.match(argv[0]):
        # The run's interpreter by version ("python3.11"); here it is the venv's python.
        argv[0] = "python"
        script = next((a for a in argv[1:] if not a.startswith("-")), None)
        if script is not None and script.endswith(".py") and not project.is_file(script):
            raise SourceError(f"{JOB_FILE} starts {script}, which is not in the project.",
                              "Build the job's own code (its artifact or commit).")
    return Start((*argv, *job.args), source=f"{JOB_FILE} source.entrypoint")


def decide_start(project: Project, given: tuple[str, ...] | None, job: Job | None,
                 deps: Dependencies) -> Start:
    """The image's start, in the documented order; a refusal says what to add."""
    if given is not None:
        return Start(given, source="--entrypoint / builder.entrypoint")
    if job is not None and job.entrypoint:
        return _job(project, job)
    procfile = _procfile(project)
    if procfile is not None:
        return procfile
    scripts = entry_scripts(project) if deps.install_project else []
    web = _django(project, deps.names) or _web_app(project, deps.names)
    if len(scripts) == 1:
        if web is not None:
            raise SourceError(f"the project has a console script ({scripts[0]}) and serves "
                              f"{web.source}, and buildq cannot tell which one the image runs.",
                              "Add a Procfile (web: ...) or pass --entrypoint.")
        return Start((), entrypoint=(scripts[0],), source=f"the console script {scripts[0]}")
    if web is not None:
        return web
    found = _dunder_main(project, bool(deps.install_project))
    if found is not None:
        return found
    candidates = [name for name in ENTRY_SCRIPTS if project.is_file(name)]
    if len(candidates) == 1:
        return Start(("python", candidates[0]), source=candidates[0])
    several = scripts if len(scripts) > 1 else candidates
    what = f"several candidates ({', '.join(several)})" if len(several) > 1 else "nothing to start"
    raise SourceError(
        "the project has no Dockerfile and buildq cannot tell how to start it: no --entrypoint, "
        f"no builder.entrypoint, and {what}.",
        "Pass --entrypoint \"python train.py\" (or set builder.entrypoint), add a Procfile, "
        f"a {' / '.join(ENTRY_SCRIPTS)}, a single [project.scripts] entry in pyproject.toml, "
        "or a Dockerfile.")
