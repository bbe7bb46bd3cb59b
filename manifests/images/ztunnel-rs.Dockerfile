# istio-rs/ztunnel-rs: the node proxy (`ztunnel-rs proxy`), the node agent
# (`ztunnel-rs cni`, binary ztunnel-rs-cni) and the CNI plugin the agent
# installs on each node (istio-cni-rs). One image for both DaemonSets, as
# the install manifests use it. Built by `cargo xtask images` from the
# workspace root:
#
#   docker build -f manifests/images/ztunnel-rs.Dockerfile \
#     --build-arg RUST_VERSION=<rust-toolchain.toml's channel> -t istio-rs/ztunnel-rs:<tag> .
ARG RUST_VERSION=1.95.0
ARG BUILD_IMAGE=docker.io/library/rust:${RUST_VERSION}-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${BUILD_IMAGE} AS build
WORKDIR /src
COPY . .
# istio-cni-rs runs on the node itself (the container runtime executes it),
# whatever the node's C library: it is linked statically (crt-static; it
# resolves no names, so glibc's static caveats do not apply). The explicit
# --target keeps the flag off build scripts.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ztunnel-rs --bin ztunnel-rs --bin ztunnel-rs-cni \
    && TARGET="$(rustc -vV | sed -n 's/^host: //p')" \
    && RUSTFLAGS="-C target-feature=+crt-static" \
       cargo build --release --locked -p ztunnel-rs --bin istio-cni-rs --target "$TARGET" \
    && mkdir /out \
    && cp target/release/ztunnel-rs target/release/ztunnel-rs-cni "target/$TARGET/release/istio-cni-rs" /out/

# The node agent runs iptables (and ip6tables), ipset and ip inside pods'
# network namespaces and the node's; the distribution's iptables picks the
# nf_tables backend (--iptables iptables-legacy for the other).
FROM ${RUNTIME_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables ipset iproute2 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/ztunnel-rs"]
