# syntax=docker/dockerfile:1
#
# One image for every realtime service; the first argument picks which runs:
#
#   docker build -t realtime .
#   docker run --rm -p 8080:8080 -e RT_NATS_URL=nats://HOST:4222 realtime rt-gateway
#   docker run --rm -p 8081:8081 -e RT_NATS_URL=nats://HOST:4222 realtime rt-broadcast
#   docker run --rm -p 8082:8082 -e RT_NATS_URL=nats://HOST:4222 realtime rt-compute
#   docker run --rm -p 8083:8083 -e RT_NATS_URL=nats://HOST:4222 \
#       -e RT_SESSION__DATABASE_URL=postgres://realtime@HOST/realtime -e PGPASSWORD=… \
#       -e RT_SESSION__JWT_HMAC_SECRET=… realtime rt-session
#
# rt-session without RT_SESSION__DATABASE_URL uses SQLite in /var/lib/realtime
# (mount a volume there to keep it: -v realtime-session:/var/lib/realtime); one
# instance only, since every instance would have its own file.
#
# Needs BuildKit (cache mounts, the heredoc below): the default builder of
# Docker 23+ and of `docker compose`. docker-compose.yml and k8s/ use this image;
# docs/deployment.md says how. scripts/validate-deploy lints this file in CI.

# Pin by digest (image@sha256:…) in a release pipeline; tags keep this readable.
ARG RUST_IMAGE=rust:1.95-bookworm
# Same Debian release as the builder, so the binaries find the glibc they were
# linked against. debian-slim rather than distroless: compose healthchecks and
# the k8s preStop hook need a shell and `sleep`.
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder

# The binaries to build and ship: each word is a workspace package whose binary
# has the same name. Adding a service is one word here (and its listen address
# in container.toml below); scripts/validate-deploy fails if a name is not a
# workspace binary, does not listen on 0.0.0.0 at an EXPOSEd port by
# container.toml, or is not run by docker-compose.yml and k8s/base.
# `--build-arg SERVICES=rt-gateway` builds a smaller image.
ARG SERVICES="rt-gateway rt-broadcast rt-compute rt-session"

WORKDIR /src
COPY . .

# Cache mounts keep the crates.io registry and compiled dependencies between
# builds, so a source change recompiles only our crates. target/ is a cache
# mount, so the binaries are copied out of it within the same step.
# --locked: build exactly Cargo.lock, as CI does.
RUN --mount=type=cache,id=realtime-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=realtime-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=realtime-target,target=/src/target,sharing=locked \
    set -eux; \
    packages=""; \
    for service in $SERVICES; do packages="$packages -p $service"; done; \
    cargo build --release --locked $packages; \
    mkdir -p /out; \
    for service in $SERVICES; do cp "target/release/$service" /out/; done

# ---------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime

# ca-certificates: tls:// NATS URLs verify against the system roots
# (async-nats uses rustls-native-certs). tini: PID 1 that forwards SIGTERM to
# the service and reaps zombies; a bare process as PID 1 ignores SIGTERM until
# it installs its own handler.
# uid/gid 10001: fixed and numeric, so Kubernetes' runAsNonRoot can check it.
# /var/lib/realtime: the one directory the user may write, for rt-session's
# embedded SQLite default (a named volume mounted there inherits the owner).
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates tini; \
    rm -rf /var/lib/apt/lists/*; \
    groupadd --system --gid 10001 realtime; \
    useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent \
        --no-create-home --shell /usr/sbin/nologin realtime; \
    install -d -o 10001 -g 10001 -m 0750 /var/lib/realtime

COPY --from=builder /out/ /usr/local/bin/
# The repository's example configuration (dev.toml: namespaces such as chat:
# and news:, and a dev-only JWT secret: never use it beyond your machine), for
# `RT_CONFIG=/etc/realtime/dev.toml`.
COPY config/ /etc/realtime/

# Image defaults: listen on every interface (the built-in defaults are
# 127.0.0.1, unreachable from outside a container) and log JSON. A file rather
# than ENV because environment variables override the file named by RT_CONFIG:
# ENV here would silently beat a mounted ConfigMap. Point RT_CONFIG at your own
# file (k8s/ does) or override single keys with RT_<SECTION>__<KEY>. No
# namespaces here: only channels without ':' work until a file configures some
# (compose uses /etc/realtime/dev.toml, Kubernetes its ConfigMap).
COPY <<'EOF' /etc/realtime/container.toml
# Defaults of the realtime container image (see the Dockerfile).
[log]
format = "json"

[gateway]
http_addr = "0.0.0.0:8080"

[broadcast]
http_addr = "0.0.0.0:8081"

[compute]
http_addr = "0.0.0.0:8082"

# The built-in default (sqlite://rt-session.db) is relative to /, which the
# service user cannot write. compose and Kubernetes use PostgreSQL instead.
[session]
http_addr = "0.0.0.0:8083"
database_url = "sqlite:///var/lib/realtime/session.db"
EOF
ENV RT_CONFIG=/etc/realtime/container.toml

USER 10001:10001
# 8080 rt-gateway (WebSocket, HTTP API, health, metrics); 8081 rt-broadcast,
# 8082 rt-compute and 8083 rt-session (health and metrics only: their requests
# arrive over NATS).
EXPOSE 8080 8081 8082 8083
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["rt-gateway"]
