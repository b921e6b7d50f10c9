# syntax=docker/dockerfile:1
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mirror ./mirror
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/cache/mirror mirror \
    && mkdir -p /var/cache/mirror /etc/mirror \
    && chown mirror /var/cache/mirror
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config.toml /etc/mirror/config.toml
USER 10001
VOLUME /var/cache/mirror
EXPOSE 5000
ENTRYPOINT ["mirror", "serve", "--config", "/etc/mirror/config.toml"]
