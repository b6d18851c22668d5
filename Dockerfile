# CPS / e-CPS gateway: `make image` builds it and `make test` builds and runs it (tests/test_image.py).
#   docker build -t cps-gateway .          (BASE: any image with Python >= 3.11 whose `pip` installs into PATH)
#   docker run --read-only --tmpfs /tmp -v /srv/gateway:/etc/gateway:ro -v gateway-audit:/var/log/gateway \
#       -p 8080:8080 cps-gateway                                                   (see docs/operations.md)
ARG BASE=python:3.11-slim
FROM ${BASE}

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

# The audit directory belongs to the gateway user. No VOLUME instruction: the operator mounts the
# configuration (/etc/gateway, with its policies/ and certs/ inside) and the audit directory; a VOLUME would
# hide what is mounted above it and leave an anonymous volume behind every container.
RUN mkdir -p /etc/gateway /var/log/gateway \
 && chown gateway:gateway /var/log/gateway

USER gateway
EXPOSE 8080 9108

HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['GATEWAY_HEALTH_URL'], timeout=2)"]

ENTRYPOINT ["gateway"]
CMD ["serve", "--config", "/etc/gateway/gateway.yaml"]
