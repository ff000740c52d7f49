import os

import fastapi
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

app = FastAPI()


@app.get("/", response_class=PlainTextResponse)
def index() -> str:
    return f"fastapi {fastapi.__version__} on port {os.environ.get('PORT')}\n"
