# syntax=docker/dockerfile:1
# The `parley` binary in a slim, non-root image: `docker build -t parley .`, then run a role
# with `docker run parley gateway` (or handler, projector). The k8s/ manifests use it.

# Build: the Rust toolchain the workspace asks for (rust-version in Cargo.toml), on the same
# Debian release as the runtime image so the binary's glibc matches.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The caches keep the registry and the build between image builds; the binary is copied
# out of the cached target/ since cache mounts are not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p parley-services --bin parley \
    && cp target/release/parley /parley

# Run: glibc, libgcc and CA certificates (rustls-native-certs reads the system's roots when
# a TLS section names no ca_file), no shell, no package manager; user nonroot (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /parley /usr/local/bin/parley
USER 65532:65532
# 8080: gateway.listen (WebSockets); 9090: admin.listen (/healthz, /readyz, /metrics).
# Both default to 127.0.0.1: set them to 0.0.0.0 in the configuration (k8s/base/parley.toml).
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/parley"]
CMD ["gateway"]
