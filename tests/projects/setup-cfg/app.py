"""A WSGI app with no framework, using the installed module."""

import os

import attrs
from cfg_site import VERSION


@attrs.frozen
class Page:
    text: str


def app(environ, start_response):
    body = Page(f"cfg-site {VERSION} on port {os.environ.get('PORT')}\n").text.encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]
