# The buildq worker image: one image for every pool, the pool chosen by the command.
# The base is a build argument so the image also builds where nothing can be pulled.
ARG BASE=python:3.11-slim
FROM ${BASE}
RUN python -m pip install --no-cache-dir --upgrade pip
WORKDIR /opt/buildq
COPY pyproject.toml README.md ./
COPY config ./config
COPY tasks ./tasks
COPY workers ./workers
RUN python -m pip install --no-cache-dir . && useradd --uid 10001 --create-home buildq
USER 10001
ENTRYPOINT ["buildq"]
CMD ["worker", "control"]
