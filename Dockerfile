# The buildq worker image: one image for every pool (and Flower), the pool chosen by the
# command, e.g. `buildq worker docker` or `buildq flower`.
#
# BASE is a build argument so the image also builds where nothing can be pulled: any
# Debian-like image with python3 (>= 3.11) and its venv module will do, e.g. one made with
#   mmdebstrap --variant=minbase --include=python3-minimal,python3-pip,python3-venv bookworm base.tar
#   docker import base.tar local/python3:bookworm
# Only the classic builder is assumed (no BuildKit syntax).
ARG BASE=python:3.11-slim-bookworm

# --- stage 1: install buildq and its dependencies into a venv ------------------------------
FROM ${BASE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/buildq
# Dependencies first, from pyproject alone, so code edits do not reinstall them.
# wheel[s]: an optional wheelhouse in the context (`pip wheel . pip setuptools wheel -w wheels`)
# lands in /src for an offline build with PIP_INSTALL_OPTIONS="--no-index --find-links /src".
COPY pyproject.toml README.md wheel[s] /src/
ARG PIP_INSTALL_OPTIONS=""
RUN mkdir -p /src/config /src/tasks /src/workers \
 && /opt/buildq/bin/pip install $PIP_INSTALL_OPTIONS --upgrade pip setuptools wheel \
 && cd /src && /opt/buildq/bin/pip install $PIP_INSTALL_OPTIONS . \
 && /opt/buildq/bin/pip uninstall -y buildq
COPY config /src/config
COPY tasks /src/tasks
COPY workers /src/workers
# Build tools are not needed at run time.
RUN /opt/buildq/bin/pip install $PIP_INSTALL_OPTIONS --no-deps /src \
 && /opt/buildq/bin/pip uninstall -y pip setuptools wheel

# --- stage 2: the runtime ------------------------------------------------------------------
FROM ${BASE}
# git fetches git sources; ca-certificates lets it and the clients speak TLS. Empty to skip
# (an image that only serves image:/archive sources, or a base that has them already).
ARG APT_PACKAGES="git ca-certificates"
RUN if [ -n "$APT_PACKAGES" ]; then \
      apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $APT_PACKAGES \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && useradd --uid 10001 --user-group --create-home --home-dir /home/buildq --shell /bin/sh buildq \
 && mkdir -p /var/lib/buildq/contexts /var/lib/buildq/work \
 && chown -R buildq:buildq /var/lib/buildq
COPY --from=build /opt/buildq /opt/buildq
ENV PATH=/opt/buildq/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    XDG_DATA_HOME=/var/lib/buildq \
    BUILDQ_WORKDIR=/var/lib/buildq/work
# Non-root by default. The docker pool needs the engine's socket: give the container the
# socket's group (compose: group_add) rather than root.
USER 10001:10001
WORKDIR /home/buildq
# 9808: worker metrics and /healthz (--metrics-port 9808); 5555: Flower.
EXPOSE 9808 5555
# No entrypoint: `docker run IMAGE buildq worker docker` reads as what it runs.
CMD ["buildq", "--help"]
