"""``python -m tests.kube.kaniko``: build the kaniko executor and its image (see the package)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tests.kube.build import BuildError
from tests.kube.kaniko import build_executor, ensure_image, push_image


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.kube.kaniko",
                                     description="Build the kaniko executor from its Go module "
                                                 "and pack it as a local image.")
    parser.add_argument("--jobs", type=int, default=1, help="GOMAXPROCS and go build -p (default 1)")
    parser.add_argument("--nice", type=int, default=19, help="niceness of the compiler (default 19)")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--push", metavar="HOST:PORT", help="also push the image to this test registry")
    parser.add_argument("--executor-only", action="store_true",
                        help="build the executor but do not pack its image (no Docker Engine "
                             "needed: the tests pack it once their engine runs)")
    parser.add_argument("--quiet", action="store_true",
                        help="say only what is built or packed (on stderr); not what is up to date, "
                             "nor the image reference")
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        if not (args.quiet and " up to date" in line):
            print(line, file=sys.stderr if args.quiet else sys.stdout, flush=True)

    try:
        executor = build_executor(jobs=args.jobs, niceness=args.nice, force=args.force, say=say)
        if args.executor_only:
            ref = str(executor)
        elif args.push:
            ref = push_image(args.push, executor, say=say)
        else:
            ref = ensure_image(executor, say=say, force=args.force)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(ref)
    return 0


if __name__ == "__main__":
    sys.exit(main())
