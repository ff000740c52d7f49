"""An ASGI app with no framework."""

import os


async def app(scope, receive, send):
    assert scope["type"] == "http"
    body = f"poetry-two on port {os.environ.get('PORT')}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})
