# syntax=docker/dockerfile:1
# One dicombridge gateway per hospital. docs/operator-guide.md ("Running it in a
# container") explains the volumes, the user and the health check; compose.yaml runs two.
#
#   /etc/dicombridge             gateway.toml and the signed directory.json
#   /var/lib/dicombridge/keys    private keys and the broker password (0700)
#   /var/lib/dicombridge/data    outbox, spool, incoming, quarantine, done, state (PHI:
#                                put it on an encrypted volume)

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the dicombridge wheel (hatchling) and the wheels of its dependencies --------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels .

# --- the gateway: no compilers, no build tools, a fixed non-root user --------------------
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DICOMBRIDGE_LOG_FORMAT=json \
    DICOMBRIDGE_CONFIG=/etc/dicombridge/gateway.toml
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir --no-index --find-links /wheels dicombridge \
    && groupadd --gid 10001 dicombridge \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/dicombridge \
        --shell /usr/sbin/nologin dicombridge \
    && install -d -o 10001 -g 10001 -m 0750 /etc/dicombridge /var/lib/dicombridge \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/dicombridge/keys /var/lib/dicombridge/data
VOLUME ["/etc/dicombridge", "/var/lib/dicombridge/keys", "/var/lib/dicombridge/data"]
USER 10001:10001
WORKDIR /var/lib/dicombridge
# DICOM (the gateway's SCP) and monitoring (/metrics, /healthz, /readyz): gateway.toml
# must say [monitoring] host = "0.0.0.0" for the port to be reachable from outside.
EXPOSE 11112 9110
# Ready: broker connected, local nodes answer C-ECHO, directory valid. No proxy: a
# hospital's HTTP_PROXY must not carry a request to the container's own loopback.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request as r; r.build_opener(r.ProxyHandler({})).open('http://127.0.0.1:9110/readyz', timeout=4)"]
# SIGTERM drains (in-flight C-STOREs, deliveries, receipts) within [gateway]
# shutdown_grace_s (20 s): give `docker stop` more than that (compose: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["dicombridge", "gateway", "run", "--config", "/etc/dicombridge/gateway.toml"]
