"""Turn a corpus case file into the files and arguments of one ``buildq build`` run.

A case file describes its input instead of holding it: archives are written here, at
test time, from a list of members (so no hostile binary is committed), directories and
git repositories are made fresh, and configs are written to a file of their own.

Placeholders in strings: ``{base}`` the base image, ``{registry}`` the test registry,
``{dest}`` a fresh repository in it, ``{tmp}`` the case's scratch directory,
``{marker}`` a path that must never be created (checked after the run), ``{source}``
the materialised source, ``{config}`` the written config file.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CASES_DIR = Path(__file__).parent / "cases"

#: Keys a case file may have; anything else is a typo that would silently test nothing.
CASE_KEYS = {"about", "group", "source", "app", "archive", "git", "config", "args", "env",
             "expect"}
EXPECT_KEYS = {"exit", "kind", "problem", "fix", "regex", "max_lines", "absent", "hidden"}
MEMBER_TYPES = {
    "file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}
FORMATS = {"gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT, "ustar": tarfile.USTAR_FORMAT}
DEFAULT_DOCKERFILE = "FROM {base}\nCOPY . /app\n"


@dataclass
class Case:
    name: str
    data: dict[str, Any]

    @property
    def expect(self) -> dict[str, Any]:
        expect: dict[str, Any] = self.data["expect"]
        return expect

    @property
    def group(self) -> str:
        return str(self.data["group"])

    @property
    def needs_engine(self) -> bool:
        """Cases whose build reaches the Docker Engine run first, beside the good build."""
        return self.expect.get("kind") == "build"


def load_cases() -> list[Case]:
    cases = []
    for path in sorted(CASES_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        unknown = set(data) - CASE_KEYS
        assert not unknown, f"{path.name}: unknown keys {unknown}"
        assert set(data["expect"]) <= EXPECT_KEYS, f"{path.name}: unknown expect keys"
        assert data.get("about") and data.get("group"), f"{path.name}: needs about and group"
        assert data["expect"].get("problem") and data["expect"].get("fix"), \
            f"{path.name}: a case names both the problem and the fix it expects"
        cases.append(Case(path.stem, data))
    # Engine-bound cases first, so the good build started with the corpus overlaps them.
    return sorted(cases, key=lambda c: (not c.needs_engine, c.name))


@dataclass
class Prepared:
    """What one run needs, and what it must leave untouched."""

    args: list[str]
    env: dict[str, str]
    absent: list[Path] = field(default_factory=list)


class Materialiser:
    def __init__(self, tmp: Path, base: str, registry: str) -> None:
        self.tmp = tmp
        self.values = {"base": base, "registry": registry, "tmp": str(tmp),
                       "dest": f"{registry}/corpus/{uuid.uuid4().hex[:10]}",
                       "marker": str(Path("/tmp") / f"buildq-corpus-pwned-{uuid.uuid4().hex}")}

    def fill(self, text: str) -> str:
        out = text
        for key, value in self.values.items():
            out = out.replace("{" + key + "}", value)
        return out

    def prepare(self, case: Case) -> Prepared:
        data = case.data
        if "app" in data:
            self.values["source"] = str(self.app(data["app"] or {}))
        elif "archive" in data:
            self.values["source"] = str(self.archive(data["archive"]))
        elif "git" in data:
            self.values["source"] = self.git_repo(data["git"] or {})
        elif "source" in data:
            self.values["source"] = self.fill(str(data["source"]))
        else:
            self.values["source"] = str(self.app({}))
        if "config" in data:
            cfg = self.tmp / "launch-config.yaml"
            text = self.fill(data["config"])
            try:
                # Latin-1 lets a case spell a raw byte (\xe9) that is not UTF-8.
                raw = text.encode("latin-1")
            except UnicodeEncodeError:
                raw = text.encode("utf-8")
            cfg.write_bytes(raw)
            self.values["config"] = str(cfg)
        default = ["build", "{source}", "--destination", "{dest}"]
        if "config" in data:
            default += ["--config", "{config}"]
        args = [self.fill(str(a)) for a in data.get("args", default)]
        env = {k: self.fill(str(v)) for k, v in (data.get("env") or {}).items()}
        absent = [Path(self.fill(p)) for p in case.expect.get("absent", [])]
        absent.append(Path(self.values["marker"]))
        return Prepared(args, env, absent)

    # --- sources ------------------------------------------------------------------

    def app(self, spec: dict[str, Any]) -> Path:
        root = self.tmp / "app"
        root.mkdir()
        dockerfile = spec.get("dockerfile", DEFAULT_DOCKERFILE)
        if dockerfile is not None:
            (root / "Dockerfile").write_text(self.fill(dockerfile))
        # A unique file, so no case is ever answered by an earlier case's image.
        (root / "nonce.txt").write_text(uuid.uuid4().hex)
        for name, text in (spec.get("files") or {}).items():
            path = root / self.name_of(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self.fill(str(text)))
        for name, target in (spec.get("symlinks") or {}).items():
            (root / self.name_of(name)).symlink_to(self.fill(target))
        for name in spec.get("fifos") or []:
            os.mkfifo(root / self.name_of(name))
        if spec.get("depth"):
            # mkdir -p of a path this deep would pass PATH_MAX: descend one level at a time.
            fd = os.open(root, os.O_RDONLY)
            try:
                for _ in range(int(spec["depth"])):
                    os.mkdir("d", dir_fd=fd)
                    child = os.open("d", os.O_RDONLY, dir_fd=fd)
                    os.close(fd)
                    fd = child
            finally:
                os.close(fd)
        return root

    @staticmethod
    def name_of(name: str) -> str:
        """A case writes undecodable bytes as \\xNN escapes (latin-1); keep them as bytes."""
        return name.encode("latin-1").decode("utf-8", "surrogateescape")

    def archive(self, spec: dict[str, Any]) -> Path:
        suffix = spec.get("suffix", ".tar.gz")
        path = self.tmp / f"{spec.get('file', 'context')}{suffix}"
        if "raw" in spec:
            path.write_bytes(self.fill(spec["raw"]).encode("latin-1"))
            return path
        mode = "w:gz" if suffix in (".tar.gz", ".tgz") else "w"
        fmt = FORMATS[spec.get("format", "gnu")]
        with tarfile.open(path, mode, format=fmt, encoding="utf-8",  # type: ignore[call-overload]
                          errors="surrogateescape") as tar:
            for member in spec["members"]:
                self.add_member(tar, member)
        return path

    def add_member(self, tar: tarfile.TarFile, member: dict[str, Any]) -> None:
        if member.get("copies"):
            for i in range(int(member["copies"])):
                self.add_member(tar, {**member, "copies": 0, "name": f"{member['name']}-{i}"})
            return
        kind = member.get("type", "file")
        name = self.fill(member["name"])
        if member.get("repeat"):
            name = name * int(member["repeat"])
        info = tarfile.TarInfo(self.name_of(name))
        info.type = MEMBER_TYPES[kind]
        info.mode = 0o644
        info.linkname = self.name_of(self.fill(member.get("link", "")))
        content: io.RawIOBase | io.BufferedIOBase | None = None
        if kind == "file":
            if "size" in member:
                info.size = int(member["size"])
                content = _Zeros(info.size)
            else:
                data = self.fill(member.get("data", "")).encode()
                info.size = len(data)
                content = io.BytesIO(data)
        if kind in ("chr", "blk"):
            info.devmajor, info.devminor = 1, 3  # /dev/null's numbers
        tar.addfile(info, content)

    def git_repo(self, spec: dict[str, Any]) -> str:
        work = self.app(spec.get("app") or {})
        git = ["git", "-c", "user.email=corpus@example.com", "-c", "user.name=corpus"]
        subprocess.run([*git, "init", "-q", "-b", "main", str(work)], check=True)
        subprocess.run([*git, "-C", str(work), "add", "."], check=True)
        subprocess.run([*git, "-C", str(work), "commit", "-qm", "one"], check=True)
        bare = self.tmp / "repo.git"
        subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
        return bare.as_uri()


class _Zeros(io.RawIOBase):
    """``size`` zero bytes without holding them: a huge member costs no memory here."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n
