# berth's image: one binary that the chart runs as `berth controller` and `berth node`.
#   docker build -t ghcr.io/berth-csi/berth:0.1.0 .

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# build.rs compiles proto/ with protox (pure Rust), so no protoc is needed.
RUN cargo build --release --locked --bin berth

FROM debian:bookworm-slim
# What berth runs: losetup, blkid, mount, umount, fsfreeze (util-linux, mount); mkfs.ext4,
# resize2fs (e2fsprogs); mkfs.xfs, xfs_growfs, xfs_io (xfsprogs); btrfs for pools on btrfs
# (btrfs-progs); ca-certificates for talking to the Kubernetes API.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        util-linux mount e2fsprogs xfsprogs btrfs-progs ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/berth /usr/local/bin/berth
ENTRYPOINT ["/usr/local/bin/berth"]
