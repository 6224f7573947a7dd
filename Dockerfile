# syntax=docker/dockerfile:1
#
# The sockshift image, built from source: `docker build -t sockshift:latest .` at the repository
# root (or `podman build`, `buildah bud`, kaniko); config/daemonset.yaml runs it.
#
# Where no base image can be pulled, `cargo xtask image` builds the same runtime image from this
# file's runtime stage (xtask/src/image.rs reads it): a Debian base made with debootstrap from the
# machine's own Debian mirror, the same packages, the binary built on the host, the same paths,
# ENTRYPOINT and CMD. That image is what tests/e2e/daemonset.rs runs. The builder stage below has
# never been built on the development machine (its rust base image cannot be pulled there); it
# repeats what `cargo xtask build-ebpf` does on Debian (xtask/src/setup.rs).

# --- builder ---------------------------------------------------------------------------------
# The eBPF programs are linked by bpf-linker 0.13, built against LLVM 22. The base must offer
# LLVM 22 Debian packages (llvm-22-dev): Debian bookworm has them through bookworm-security
# (1:22.1.x~deb12u1, enabled in the official images), as on the development machine; a base
# without them needs another source of LLVM 22 (e.g. apt.llvm.org), which is not available offline.
FROM rust:1.95-bookworm AS builder

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends llvm-22-dev \
 && rm -rf /var/lib/apt/lists/*

# agent/build.rs (aya-build) builds the eBPF crate with `rustup run nightly cargo ...` and
# build-std, so it needs a toolchain named exactly "nightly" with rust-src. It must be a nightly
# whose LLVM is 22 (this one: rustc 1.97.0-nightly, LLVM 22.1.4): newer nightlies carry LLVM 23,
# which bpf-linker 0.13 cannot read, so `rustup toolchain install nightly` (the latest) would
# break the build. Install the dated toolchain and expose it under the name "nightly".
ARG EBPF_NIGHTLY=nightly-2026-05-20
RUN rustup toolchain install "$EBPF_NIGHTLY" --profile minimal --component rust-src \
 && host="$(rustc -vV | sed -n 's/^host: //p')" \
 && ln -s "$RUSTUP_HOME/toolchains/$EBPF_NIGHTLY-$host" "$RUSTUP_HOME/toolchains/nightly-$host" \
 && rustup run nightly rustc --version

RUN LLVM_PREFIX=/usr/lib/llvm-22 cargo install --locked bpf-linker --version 0.13.0 \
        --no-default-features --features llvm-22

WORKDIR /src
COPY . .
# The eBPF object is embedded in the binary (agent/build.rs): the runtime image needs no LLVM.
RUN cargo build --release --locked -p agent

# --- runtime ---------------------------------------------------------------------------------
# `cargo xtask image` reads this stage: the Debian suite in FROM, RUNTIME_PACKAGES, where COPY
# puts the binary, and the ENV, LABEL, WORKDIR, ENTRYPOINT and CMD lines. Keep RUN to installing
# RUNTIME_PACKAGES (debootstrap installs them there) so that both builds give the same image.
# Same Debian release as the builder, so the binary's glibc matches.
FROM debian:bookworm-slim AS runtime
# iproute2's `ss -K` (with util-linux's nsenter, already in the base) closes a rolled-back
# canary's connections (rollback.terminate_connections).
ARG RUNTIME_PACKAGES="iproute2"
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $RUNTIME_PACKAGES \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /src/target/release/sockshift /usr/local/bin/sockshift
# Root, as in the DaemonSet (runAsUser 0, capabilities limited there).
ENTRYPOINT ["sockshift"]
# `docker run sockshift:latest` runs what the DaemonSet's command runs; other arguments give the
# CLI (`docker run --network host sockshift:latest status`).
CMD ["agent", "--config", "/etc/sockshift/sockshift.toml"]
