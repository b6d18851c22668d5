# CPS / e-CPS gateway. UNTESTED here (no Docker engine on the build machine): build and smoke-test before use.
#   docker build -t cps-gateway .
#   docker run -v ./conf:/etc/gateway:ro ... cps-gateway            (see docs/operations.md)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # What the HEALTHCHECK asks; must match server.listen in the mounted gateway.yaml.
    GATEWAY_HEALTH_URL=http://127.0.0.1:8080/.gateway/healthz

# A fixed, unprivileged uid/gid so mounted volumes (audit) can be chowned on the host.
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/gateway --create-home \
            --shell /usr/sbin/nologin gateway

WORKDIR /opt/gateway
COPY pyproject.toml setup.py README.md ./
COPY gateway ./gateway
# gateway/default/policies and gateway/devtools/card-login.conf.template are symlinks into these two:
COPY policies ./policies
COPY deploy/nginx ./deploy/nginx
RUN pip install . \
 && rm -rf /opt/gateway/build

RUN mkdir -p /etc/gateway/policies /etc/gateway/certs /var/log/gateway \
 && chown gateway:gateway /var/log/gateway
VOLUME ["/etc/gateway", "/etc/gateway/policies", "/etc/gateway/certs", "/var/log/gateway"]

USER gateway
EXPOSE 8080 9108

HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['GATEWAY_HEALTH_URL'], timeout=2)"]

ENTRYPOINT ["gateway"]
CMD ["serve", "--config", "/etc/gateway/gateway.yaml"]
