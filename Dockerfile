# syntax=docker/dockerfile:1
# Image of the gitlab-registry-operator binary: built with the pinned Rust toolchain and
# Cargo.lock, shipped on distroless (glibc, CA certificates, no shell) as uid 65532.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin gitlab-registry-operator \
 && install -D -m 0755 target/release/gitlab-registry-operator /out/gitlab-registry-operator

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="gitlab-registry-operator" \
      org.opencontainers.image.description="Kubernetes operator for GitLab container virtual registries, upstreams and tag cleanups" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/gitlab-registry-operator /usr/local/bin/gitlab-registry-operator
USER 65532:65532
# /metrics, /healthz and /readyz
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/gitlab-registry-operator"]
CMD ["run"]
