# The `strait` gateway image the chart runs (values.image). Build from the
# repository root:  docker build -t ghcr.io/strait/strait:0.1.0 .
FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p strait-cli --bin strait \
    && cp target/release/strait /strait

# Non-root (uid 65532), no shell; the chart mounts config and certificates
# read-only and keeps the root filesystem read-only.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /strait /strait
USER 65532:65532
ENTRYPOINT ["/strait"]
