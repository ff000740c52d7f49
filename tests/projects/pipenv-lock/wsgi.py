"""A WSGI app with no framework: the page names the project and its port."""

import os


def application(environ, start_response):
    body = f"pipenv-app on port {os.environ.get('PORT')}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
