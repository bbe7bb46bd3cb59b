# istio-rs/istiod-rs: the control plane. Built by `cargo xtask images` from
# the workspace root (the build context; .dockerignore leaves target/ out).
#
#   docker build -f manifests/images/istiod-rs.Dockerfile \
#     --build-arg RUST_VERSION=<rust-toolchain.toml's channel> -t istio-rs/istiod-rs:<tag> .
#
# Both stages' images are build arguments, so an air-gapped builder can
# point them at images it already holds.
ARG RUST_VERSION=1.95.0
ARG BUILD_IMAGE=docker.io/library/rust:${RUST_VERSION}-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${BUILD_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p istiod-rs --bin istiod-rs \
    && cp target/release/istiod-rs /istiod-rs

# glibc and nothing else: istiod-rs runs no other program.
FROM ${RUNTIME_IMAGE}
COPY --from=build /istiod-rs /usr/local/bin/istiod-rs
# The install's securityContext runs it as 1337 with a read-only root.
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/istiod-rs"]
