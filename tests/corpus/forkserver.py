"""Run ``buildq`` commands in forks of one warm interpreter, for the corpus.

Starting Python and importing Celery, pydantic and the docker SDK costs about a second,
which over 130 cases is most of the corpus's time. This server imports the CLI once;
each request is then run in a fresh ``fork()`` with its own environment, working
directory, argv, stdout and stderr files, through ``tasks.cli.main`` exactly as the
console script calls it. Nothing a case does survives its fork. Set
``BUILDQ_CORPUS_FRESH=1`` to run every case as a new process instead.

Protocol: one JSON request per line on stdin (``args``, ``env``, ``stdout``, ``stderr``,
``timeout``), one JSON line back on stdout (``code``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from typing import Any


def _child(request: dict[str, Any]) -> int:
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(out, fd)
        os.close(out)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = ["buildq", *request["args"]]
    # A hung case dies instead of hanging the corpus (the parent reports the signal).
    signal.alarm(int(request["timeout"]))
    import tasks.app

    # tasks.app reads the environment when first imported; this fork has a new one.
    tasks.app._settings = None
    from tasks.cli import main

    try:
        main()
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        print(exc.code, file=sys.stderr)
        return 1
    return 0


def serve() -> None:
    # Imported before any fork so that each child starts warm.
    import tasks.cli
    import tasks.stages  # noqa: F401

    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(request)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        print(json.dumps({"code": code}), flush=True)


if __name__ == "__main__":
    serve()
