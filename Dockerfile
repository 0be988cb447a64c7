# Images for ots. The last stage, `runtime`, is the default target:
#
#   docker build -t ots .                      the service
#   docker build --target test -t ots-test .   the service plus its test suite
#
# Only Dockerfile syntax that the classic builder also understands is used
# (no RUN --mount, no heredocs), because `docker-compose run` in
# docker-compose 1.29 builds through the Engine API without BuildKit.

# Debian 12 (bookworm) slim with CPython 3.13.12. The tag names both the
# Python release and the distribution, so a rebuild gets the same interpreter.
FROM python:3.13.12-slim-bookworm AS base

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# A fixed numeric id, so orchestrators that check runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 ots \
    && useradd --system --uid 10001 --gid ots --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin ots


# Runtime dependencies in /opt/venv. This stage reads only setup.py, so
# editing the code or the README does not reinstall them. setup.py needs a
# README and a package to run, so an empty placeholder of each stands in, and
# the placeholder package is uninstalled again afterwards.
FROM base AS deps
WORKDIR /src
COPY setup.py ./
RUN python -m venv /opt/venv \
    && mkdir ots \
    && touch ots/__init__.py README.md \
    && pip install . \
    && pip uninstall --yes ots


# Runtime and test dependencies, for the test image.
FROM deps AS test-deps
# DL3013 asks for pinned PyPI packages, but ".[test]" is this project, and
# setup.py sets the version ranges of what it pulls in.
# hadolint ignore=DL3013
RUN pip install ".[test]" \
    && pip uninstall --yes ots


# The ots wheel itself, built from the real source.
FROM base AS build
WORKDIR /src
COPY setup.py pyproject.toml README.md ./
COPY ots ./ots
RUN pip wheel --no-deps --wheel-dir /dist .


# The service with its test suite, which `pytest` runs. Without MONGO_URI
# the suite starts its own MongoDB wire-protocol test server.
FROM base AS test
COPY --from=test-deps /opt/venv /opt/venv
COPY --from=build /dist/ /tmp/dist/
RUN pip install --no-index --no-deps /tmp/dist/*.whl \
    && rm -rf /tmp/dist \
    && pip check
# The working directory belongs to the test user, so pytest can write its
# cache there. The suite imports the installed wheel, not a source tree.
RUN install --directory --owner=10001 --group=10001 /srv/ots
WORKDIR /srv/ots
# tests/test_compose.py checks the container files, so they come along.
COPY pyproject.toml Dockerfile docker-compose.yml docker-compose.hub.yml ./
COPY config ./config
COPY tests ./tests
USER 10001:10001
CMD ["pytest"]


# The service. The publishing workflow adds the version, revision, source
# and creation-time labels.
FROM base AS runtime
LABEL org.opencontainers.image.title="ots" \
      org.opencontainers.image.description="One-time secret service: a JSON API on Tornado and MongoDB, encrypted at rest" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="docker.io/library/python:3.13.12-slim-bookworm"

COPY --from=deps /opt/venv /opt/venv
COPY --from=build /dist/ /tmp/dist/
RUN pip install --no-index --no-deps /tmp/dist/*.whl \
    && rm -rf /tmp/dist \
    && pip check

# The service binds to 127.0.0.1 by default. In a container it must listen
# on every interface, or a published port cannot reach it.
ENV HOST=0.0.0.0 \
    PORT=8000
EXPOSE 8000

USER 10001:10001

# The slim image has no curl, so the check uses the interpreter. It connects
# to 127.0.0.1, so it needs HOST to be 0.0.0.0 or a loopback address.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/healthz', timeout=3)"]

# On SIGTERM, ots stops accepting connections and lets requests in flight
# finish for up to SHUTDOWN_GRACE_SECONDS. Give `docker stop -t` more than that.
STOPSIGNAL SIGTERM
CMD ["ots"]
