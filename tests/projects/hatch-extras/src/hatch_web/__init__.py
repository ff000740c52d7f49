"""A WSGI app built by a factory (its kind is not visible where it is bound)."""

import os
from importlib.metadata import version

import attrs


@attrs.frozen
class Site:
    name: str

    def __call__(self, environ, start_response):
        body = f"{self.name} {version('hatch-web')} on port {os.environ.get('PORT')}\n".encode()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]


def create_app() -> Site:
    return Site("hatch-web")
