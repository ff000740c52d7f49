"""``buildq doctor``: a preflight that runs each thing a build needs, for real.

Each check is one row — PASS, FAIL or SKIP — and a FAIL names the exact permission or
setting that is missing, in the terms of the cloud that grants it, plus how to grant
it. Checks that depend on an earlier one (no login → no tag check) are skipped rather
than failed twice. Nothing secret is ever put in a row: identities are names and ids,
errors are buildq's own messages (which never carry credentials).
"""

from __future__ import annotations

import contextlib
import io
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Literal

from config.errors import BuildqError, ConfigError, RegistryError

if TYPE_CHECKING:
    from config.references import ImageRef
    from config.schema import LaunchConfig
    from config.settings import Settings
    from workers.kube import Access
    from workers.registries.base import Registry

Status = Literal["PASS", "FAIL", "SKIP"]

#: Tag the tag-check probe asks for; it never exists, and asking is all that is tested.
PROBE_TAG = "buildq-doctor-probe"

#: Per store scheme: the permission each probe step needs, and how it is granted.
STORE_PERMISSIONS: dict[str, dict[str, str]] = {
    "s3": {"exists": "s3:ListBucket", "write": "s3:PutObject", "read": "s3:GetObject",
           "delete": "s3:DeleteObject",
           "grant": "Allow it in the IAM policy of the workers' role on arn:aws:s3:::<bucket> "
                    "(ListBucket) and arn:aws:s3:::<bucket>/* (object actions)."},
    "gs": {"exists": "storage.objects.get", "write": "storage.objects.create",
           "read": "storage.objects.get", "delete": "storage.objects.delete",
           "grant": "Grant the workers' service account roles/storage.objectAdmin on the bucket "
                    "(gcloud storage buckets add-iam-policy-binding)."},
    "azure": {op: "Storage Blob Data Contributor" for op in ("exists", "write", "read", "delete")}
    | {"grant": "Assign the workers' identity the Storage Blob Data Contributor role on the "
                "storage account or container (az role assignment create)."},
    "file": {op: f"{op} access to the directory" for op in ("exists", "write", "read", "delete")}
    | {"grant": "Make the directory writable by the user the workers run as."},
}

@dataclass(frozen=True)
class Check:
    """One row of the report."""

    name: str
    status: Status
    detail: str
    #: How to fix a FAIL (the permission to grant, the setting to change).
    fix: str = ""


def _fail(name: str, exc: BuildqError, fix: str | None = None) -> Check:
    return Check(name, "FAIL", exc.message, fix if fix is not None else (exc.hint or ""))


class Doctor:
    """Runs the checks in order; later ones see what earlier ones found."""

    def __init__(self, settings: Settings, config_path: str | None = None,
                 registry_factory: Callable[[ImageRef, Settings], Registry] | None = None,
                 docker_url: str | None = None, kube_client: Any = None) -> None:
        self.settings = settings
        self.config_path = config_path
        self._registry_factory = registry_factory
        self._docker_url = docker_url
        self._kube_client = kube_client
        self.checks: list[Check] = []

    def run(self) -> list[Check]:
        cfg = self._config()
        dest = None
        if cfg is not None:
            try:
                dest = cfg.destination()
            except ConfigError:
                dest = None
        self._registry_checks(dest)
        self._store_check(cfg)
        self._builder_check(cfg)
        return self.checks

    def _add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    # -- config --------------------------------------------------------------------------

    def _config(self) -> LaunchConfig | None:
        from config import load_config

        try:
            cfg = load_config(self.config_path, env_path=self.settings.config_path)
        except ConfigError as exc:
            self._add(Check("config valid", "FAIL", exc.message, exc.hint or ""))
            return None
        note = f"; {len(cfg.warnings)} warning(s): " + " ".join(cfg.warnings) if cfg.warnings else ""
        self._add(Check("config valid", "PASS", f"{cfg.origin}{note}"))
        return cfg

    # -- registry ------------------------------------------------------------------------

    def _registry(self, dest: ImageRef) -> Registry:
        if self._registry_factory is not None:
            return self._registry_factory(dest, self.settings)
        from workers.registries import registry_for

        return registry_for(dest, self.settings)

    def _registry_checks(self, dest: ImageRef | None) -> None:
        names = ("registry credentials", "registry login", "tag check", "push permitted")
        if dest is None:
            for name in names:
                self._add(Check(name, "SKIP", "no destination in the config"))
            return
        try:
            registry = self._registry(dest)
            identity = registry.identity()
        except BuildqError as exc:
            self._add(_fail(names[0], exc))
            for name in names[1:]:
                self._add(Check(name, "SKIP", "credentials did not resolve"))
            return
        self._add(Check(names[0], "PASS", f"{type(registry).__name__}: {identity}"))

        via = f" via {registry.endpoint}" if registry.endpoint != registry.host else ""
        try:
            registry.ping()
        except BuildqError as exc:
            self._add(_fail(names[1], exc))
            for name in names[2:]:
                self._add(Check(name, "SKIP", "login failed"))
            return
        self._add(Check(names[1], "PASS", f"logged in to {registry.host}{via}"))

        try:
            registry.manifest_digest(dest, PROBE_TAG)
        except RegistryError as exc:
            self._add(_fail(names[2], exc, self._grant(registry, registry.pull_permission,
                                                       exc)))
        else:
            self._add(Check(names[2], "PASS",
                            f"{registry.pull_permission} allowed on {dest.repository}"))

        try:
            registry.check_push(dest)
        except RegistryError as exc:
            self._add(_fail(names[3], exc, self._grant(registry, registry.push_permission,
                                                       exc)))
        else:
            self._add(Check(names[3], "PASS",
                            f"{registry.push_permission} allowed: a blob upload to "
                            f"{dest.repository} was started and cancelled"))

    @staticmethod
    def _grant(registry: Registry, permission: str, exc: BuildqError) -> str:
        hint = exc.hint or registry.credentials_hint()
        return f"needs {permission}. {hint}"

    # -- context store -------------------------------------------------------------------

    def _store_check(self, cfg: LaunchConfig | None) -> None:
        name = "context store"
        url = (cfg.builder.build_context_store if cfg else None) or self.settings.context_store
        if not url:
            self._add(Check(name, "SKIP", "no context store configured"))
            return
        from urllib.parse import urlsplit

        scheme = urlsplit(url).scheme
        kind = "azure" if scheme == "https" else scheme
        perms = STORE_PERMISSIONS.get(kind, STORE_PERMISSIONS["file"])
        try:
            from workers.stores import store_for_url

            store = store_for_url(url, self.settings)
        except (ImportError, ConfigError) as exc:
            # The backend for this scheme may not be installed (or written) yet.
            self._add(Check(name, "SKIP", f"no store backend for {url}: {exc}"))
            return
        except BuildqError as exc:
            self._add(_fail(name, exc))
            return
        key = f"buildq-doctor-{uuid.uuid4().hex}.probe"
        payload = b"buildq doctor probe\n"
        step = "exists"
        try:
            store.exists(key)
            step = "write"
            with store.writer(key) as out:
                out.write(payload)
            step = "read"
            with store.reader(key) as stream:
                if stream.read() != payload:
                    raise ConfigError(f"the probe object read back from {url} differs.",
                                      "Check the store's consistency settings.")
            step = "delete"
            store.delete(key)
        except Exception as exc:
            message = exc.message if isinstance(exc, BuildqError) else \
                f"{type(exc).__name__}: {str(exc)[:200]}"
            self._add(Check(name, "FAIL", f"{step} of a probe object in {url} failed: {message}",
                            f"needs {perms[step]}. {perms['grant']}"))
            if step in ("read", "delete"):
                # Leave nothing behind when only the later steps failed.
                with contextlib.suppress(Exception):
                    store.delete(key)
            return
        self._add(Check(name, "PASS", f"wrote, read and deleted a probe object in {url}"))

    # -- builder -------------------------------------------------------------------------

    def _builder_check(self, cfg: LaunchConfig | None) -> None:
        builder = cfg.builder.type if cfg else None
        if builder == "noop":
            self._add(Check("builder", "SKIP", "builder.type is noop: nothing is built"))
        elif builder == "kaniko":
            namespace = self.settings.kube_namespace if cfg is None else _namespace(cfg, self.settings)
            if self._kube_check(namespace) and cfg is not None:
                self._service_account_check(cfg, namespace)
        else:
            self._docker_check(builder)

    def _docker_check(self, builder: str | None) -> None:
        import docker

        name = "Docker Engine"
        where = self._docker_url or "DOCKER_HOST or /var/run/docker.sock"
        try:
            client = (docker.DockerClient(base_url=self._docker_url, timeout=5) if self._docker_url
                      else docker.from_env(timeout=5))
            version = client.version()
            client.close()
        except Exception as exc:  # any failure means "no engine answers"
            # The innermost socket error ("Connection refused") says more than the wrappers.
            found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
            reason = found.group(1).strip() if found else type(exc).__name__
            if builder != "docker":
                # The seed's rule: with no builder.type and no engine, building is disabled.
                self._add(Check(name, "SKIP", f"no Docker Engine at {where} ({reason}); with no "
                                "builder.type the builder defaults to noop"))
                return
            self._add(Check(name, "FAIL", f"no Docker Engine answers at {where} ({reason}), "
                            "but builder.type is docker",
                            "Start dockerd on the build host or set DOCKER_HOST; or set "
                            "builder.type: kaniko (or noop) in the launch config."))
            return
        self._add(Check(name, "PASS", f"Docker Engine {version.get('Version', '?')} at {where}"))

    def _api_client(self) -> Any:
        if self._kube_client is None:
            from workers.kube import new_api_client

            self._kube_client = new_api_client()
        return self._kube_client

    def _kube_check(self, namespace: str) -> bool:
        """Whether the API server answered (what else to ask it depends on that)."""
        name = "Kubernetes API"
        # The pool's own table: what it asks of the API server is what is checked here.
        from workers.kube import KANIKO_ACCESS

        try:
            api_client = self._api_client()
            from kubernetes import client

            auth = client.AuthorizationV1Api(api_client)
            missing: list[Access] = []
            for access in KANIKO_ACCESS:
                resource, _, sub = access.resource.partition("/")
                body: Any = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                             "spec": {"resourceAttributes": {
                                 "namespace": namespace, "verb": access.verb, "resource": resource,
                                 "group": access.group, "subresource": sub}}}
                review = auth.create_self_subject_access_review(body)
                allowed = review.status.allowed if review.status else False
                if not allowed:
                    missing.append(access)
        except BuildqError as exc:
            self._add(_fail(name, exc))
            return False
        except Exception as exc:  # the client raises many kinds
            self._add(Check(name, "FAIL",
                            f"the SelfSubjectAccessReview could not be made: "
                            f"{type(exc).__name__} {getattr(exc, 'status', '')}".rstrip(),
                            "Check KUBECONFIG or the pod's service account."))
            return False
        if missing:
            self._add(Check(
                name, "FAIL", f"the kaniko pool may not {', '.join(map(str, missing))} in namespace "
                f"{namespace!r} (SelfSubjectAccessReview)",
                f"needs {missing[0]}. Grant a Role in {namespace!r} with the rules "
                f"{access_rules()} (deploy/kubernetes/role.yaml), bound to the workers' "
                "service account."))
            return True
        self._add(Check(name, "PASS", f"may {', '.join(map(str, KANIKO_ACCESS))} in namespace "
                                      f"{namespace!r}"))
        return True

    def _service_account_check(self, cfg: LaunchConfig, namespace: str) -> None:
        """The ServiceAccount the Jobs will run as exists: a Job naming a missing one is
        accepted, and then its controller creates no pod until the deadline."""
        from workers.builders.kaniko.manifest import resolve_service_account

        name = "kaniko service account"
        account = resolve_service_account(cfg, namespace)
        if account is None:
            self._add(Check(name, "SKIP", f"Jobs run as namespace {namespace!r}'s default account "
                            "(no serviceAccountName in kaniko-config, and the pool runs outside "
                            "that namespace)"))
            return
        from workers.kube import in_cluster_namespace, in_cluster_service_account

        if (account, namespace) == (in_cluster_service_account(), in_cluster_namespace()):
            self._add(Check(name, "PASS", f"Jobs run as this pool's own ServiceAccount {account!r} "
                                          f"in namespace {namespace!r}"))
            return
        try:
            from kubernetes import client

            client.CoreV1Api(self._api_client()).read_namespaced_service_account(account, namespace)
        except Exception as exc:  # the client raises many kinds
            status = getattr(exc, "status", None)
            if status == 404:
                self._add(Check(name, "FAIL", f"ServiceAccount {account!r} does not exist in "
                                f"namespace {namespace!r}; the kaniko Jobs name it",
                                "Create it (deploy/kubernetes/serviceaccount.yaml) with the cloud "
                                "role kaniko pushes with, or name another in kaniko-config's "
                                "spec.template.spec.serviceAccountName."))
            elif status == 403:
                self._add(Check(name, "SKIP", f"Jobs run as {account!r}; whether it exists in "
                                f"{namespace!r} is not checked (the pool's Role grants no get "
                                "serviceaccounts, and needs none)"))
            else:
                self._add(Check(name, "FAIL", f"could not read ServiceAccount {account!r} in "
                                f"{namespace!r}: {type(exc).__name__} {status or ''}".rstrip(),
                                "Check KUBECONFIG or the pod's service account."))
            return
        self._add(Check(name, "PASS", f"Jobs run as ServiceAccount {account!r}, which exists in "
                                      f"namespace {namespace!r}"))


def access_rules() -> str:
    """The kaniko pool's table as RBAC rules in words: ``jobs.batch: create, get; pods: list``."""
    from workers.kube import KANIKO_ACCESS

    resources = dict.fromkeys(a.resource_name for a in KANIKO_ACCESS)
    return "; ".join(f"{r}: {', '.join(a.verb for a in KANIKO_ACCESS if a.resource_name == r)}"
                     for r in resources)


def _namespace(cfg: LaunchConfig, settings: Settings) -> str:
    spec = cfg.builder.kaniko_config or {}
    metadata = spec.get("metadata") if isinstance(spec, dict) else None
    if isinstance(metadata, dict) and isinstance(metadata.get("namespace"), str):
        return str(metadata["namespace"])
    from workers.kube import in_cluster_namespace

    return in_cluster_namespace() or settings.kube_namespace


def failed(checks: list[Check]) -> bool:
    return any(c.status == "FAIL" for c in checks)


def render(checks: list[Check], out: IO[str], *, tty: bool | None = None) -> None:
    """A rich table on a terminal; aligned plain text (one row per check) otherwise."""
    is_tty = out.isatty() if tty is None else tty
    if is_tty:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        styles = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}
        table = Table("check", "status", "detail", show_lines=False)
        for c in checks:
            # Text, not markup: details quote "[...]" from error messages verbatim.
            detail = Text(c.detail)
            if c.fix and c.status == "FAIL":
                detail.append(f"\nfix: {c.fix}", style="dim")
            table.add_row(c.name, Text(c.status, style=styles[c.status]), detail)
        Console(file=out, force_terminal=True).print(table)
        return
    width = max((len(c.name) for c in checks), default=0)
    buffer = io.StringIO()
    for c in checks:
        buffer.write(f"{c.status:<4}  {c.name:<{width}}  {c.detail}\n")
        if c.fix and c.status == "FAIL":
            buffer.write(f"{'':<4}  {'':<{width}}  fix: {c.fix}\n")
    out.write(buffer.getvalue())
    out.flush()


def run_doctor(settings: Settings, config_path: str | None, out: IO[str]) -> int:
    """Run every check, print the table, return the exit code (0: nothing failed)."""
    checks = Doctor(settings, config_path).run()
    render(checks, out)
    return 1 if failed(checks) else 0
