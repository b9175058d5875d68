# The project's binaries in one image (used by compose.yml for setup and the jobs).
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake libcurl4-openssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --bins \
    && mkdir /out \
    && find target/release -maxdepth 1 -type f -executable -exec cp {} /out/ \;

FROM debian:bookworm-slim
# curl: compose's health checks of the jobs (`/health`).
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libcurl4 curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
USER 10001
