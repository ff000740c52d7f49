"""A WSGI app with no framework: the page names the project and its server."""

import os


def app(environ, start_response):
    body = f"uv-greeter on port {os.environ.get('PORT')}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
