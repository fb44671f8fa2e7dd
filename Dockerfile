# syntax=docker/dockerfile:1
# cachectl's container image (docs/packaging.md, "Container image"):
#
#   docker build -t cachectl .
#   docker run -p 8080:8080 -v cachectl-data:/var/lib/cachectl cachectl
#
# Two stages: the workspace is compiled in Debian 12's Rust image; the runtime is Debian 12 slim
# with the binary, the packaged configuration and an unprivileged user. No Docker engine runs on
# the machine where cachectl is developed, so this file is written and reviewed, not built there.

# --- build ---------------------------------------------------------------------------------
# The workspace's rust-version (Cargo.toml) or newer, on Debian 12 like the runtime (same glibc).
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
# Caches keep the registry and the target directory between builds; the binary is copied out
# of the cache mount so that the next stage can take it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p cachectl \
    && install -m 0755 target/release/cachectl /usr/local/bin/cachectl

# --- runtime -------------------------------------------------------------------------------
FROM debian:bookworm-slim
# A fixed uid/gid, so that a mounted volume's ownership can be set from the host.
RUN groupadd --system --gid 10001 cachectl \
    && useradd --system --uid 10001 --gid cachectl --home-dir /var/lib/cachectl --create-home \
       --shell /usr/sbin/nologin cachectl \
    && chmod 0750 /var/lib/cachectl
COPY --from=build /usr/local/bin/cachectl /usr/bin/cachectl
# The Debian package's configuration: SQLite store in /var/lib/cachectl. Mount your own over it
# (it holds tokens and secret keys), or override keys with CACHECTL_<SECTION>__<KEY>.
COPY --chown=root:cachectl --chmod=0640 deploy/debian/cachectl.toml /etc/cachectl/cachectl.toml
USER cachectl:cachectl
WORKDIR /var/lib/cachectl
VOLUME ["/var/lib/cachectl"]
# Inside a container the API must listen on every interface to be reached through a published port.
ENV CACHECTL_SERVER__LISTEN=0.0.0.0:8080 \
    CACHECTL_LOG=info
EXPOSE 8080
# SIGTERM is the clean stop (in-flight items get [server] shutdown_grace); cachectl runs as PID 1.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/cachectl"]
CMD ["serve", "--config", "/etc/cachectl/cachectl.toml"]
