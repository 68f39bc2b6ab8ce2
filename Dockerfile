# tickserve worker and monitor image: `docker build -t tickserve .`
# Stage 1 builds the virtual environment from wheels; stage 2 copies it onto the same slim base
# with no build tools, running as a non-root user. The base is pinned to a patch release.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY tickserve/ tickserve/
COPY stream/ stream/
COPY features/ features/
COPY inference/ inference/
COPY training/ training/
COPY deploy/ deploy/
# the project itself, not editable: the final image has no source tree
RUN /opt/venv/bin/pip install --no-compile /src

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="tickserve" \
      org.opencontainers.image.description="Kafka ticks -> Numba features -> ONNX signals" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 tickserve \
 && useradd --system --uid 10001 --gid tickserve --home-dir /var/lib/tickserve --create-home tickserve
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NUMBA_CACHE_DIR=/tmp/numba \
    TICKSERVE_STATE_DIR=/var/lib/tickserve \
    TICKSERVE_HTTP_HOST=0.0.0.0 \
    TICKSERVE_HTTP_PORT=8000
WORKDIR /var/lib/tickserve
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"]
ENTRYPOINT ["tickserve"]
CMD ["serve"]
