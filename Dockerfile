# The mirror as a container: `docker build -t mirror .` (or `buildah bud`).
#
# Offline, pip takes the wheels from a directory instead of an index:
#   buildah bud --volume /path/to/wheels:/wheels:ro \
#     --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels -t mirror .
# (`pip download --only-binary=:all: --dest /path/to/wheels . setuptools wheel`
# on a connected machine fills it), or `--build-arg PIP_INDEX_URL=…` names a local
# package index.

FROM python:3.11-slim AS build
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
ARG PIP_INDEX_URL
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# A virtual environment: one directory to copy into the final stage, and pip
# never touches the base's own Python.
RUN python3 -m venv /opt/mirror
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mirror ./mirror
# botocore (the S3 back end's client) ships models of every AWS service, 27 MB; the
# mirror needs S3's, and STS's for credentials from an assumed role (EKS, IRSA).
RUN /opt/mirror/bin/pip install . \
    && /opt/mirror/bin/pip uninstall --yes pip setuptools \
    && find /opt/mirror/lib/python3*/site-packages/botocore/data -mindepth 1 -maxdepth 1 \
        -type d ! -name s3 ! -name sts -exec rm -rf {} +

FROM python:3.11-slim
RUN groupadd --system --gid 10001 mirror \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/cache/mirror --shell /usr/sbin/nologin mirror \
    && mkdir -p /var/cache/mirror /etc/mirror \
    && chown 10001:10001 /var/cache/mirror
COPY --from=build /opt/mirror /opt/mirror
COPY config.toml /etc/mirror/config.toml
ENV PATH=/opt/mirror/bin:$PATH PYTHONUNBUFFERED=1
# Numeric, so runtimes that enforce non-root (runAsNonRoot) can tell without /etc/passwd.
USER 10001:10001
VOLUME /var/cache/mirror
EXPOSE 5000
# No curl in the image: `mirror healthcheck` asks /healthz on the configured port
# (over HTTPS when the configuration turns TLS on).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["mirror", "healthcheck", "--config", "/etc/mirror/config.toml"]
# uvicorn stops on SIGTERM: it stops accepting, gives requests under way 5 s, then
# cancels what is left; fills cut short remove their temporary files.
STOPSIGNAL SIGTERM
ENTRYPOINT ["mirror", "serve", "--config", "/etc/mirror/config.toml"]
