# syntax=docker/dockerfile:1
# custodia-app, one Custodia app worker: docker build -f Dockerfile.app -t custodia-app .
# (compose.yaml builds it for you: docker compose up --build). See README.md, "Deploy".

# ---- build ------------------------------------------------------------------------------------
# The toolchain CI tests with (the locked dependencies need Rust 1.95), on Debian bookworm.
FROM rust:1.95.0-bookworm AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src

# Dependency layer: the workspace manifests, the lock file and empty sources. Compiling this
# caches every dependency until Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
COPY proxy/Cargo.toml proxy/
COPY app/Cargo.toml app/
COPY identity/Cargo.toml identity/
COPY probe/Cargo.toml probe/
RUN mkdir -p src proxy/src app/src identity/src probe/src benches \
 && for dir in src proxy/src app/src identity/src probe/src; do \
      touch "$dir/lib.rs"; echo 'fn main() {}' > "$dir/main.rs"; \
    done \
 && echo 'fn main() {}' > benches/request_path.rs \
 && echo 'fn main() {}' > benches/end_to_end.rs \
 && cargo build --release --locked -p custodia-app \
 && rm -rf app/src identity/src probe/src

# The real sources of the worker and the crate it uses; the other members keep their stubs.
COPY identity/src identity/src
COPY probe/src probe/src
COPY app/src app/src
RUN find app/src identity/src probe/src -name '*.rs' -exec touch {} + \
 && cargo build --release --locked -p custodia-app \
 && install -m 0755 target/release/custodia-app /usr/local/bin/custodia-app

# ---- runtime ----------------------------------------------------------------------------------
# glibc + libgcc, no shell, no package manager; runs as uid 65532 ("nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="custodia-app" \
      org.opencontainers.image.description="Custodia app worker: the home page and JSON greeting API on hyper" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.vendor="Custodia" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
COPY --from=build /usr/local/bin/custodia-app /usr/local/bin/custodia-app
USER 65532:65532
EXPOSE 8000
# No curl here: the binary probes itself (exit 0 on a 200 within 3 s).
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/custodia-app", "--probe", "http://127.0.0.1:8000/healthz"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/custodia-app"]
CMD ["--listen", "0.0.0.0:8000"]
