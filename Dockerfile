# syntax=docker/dockerfile:1
# Spool CSI driver image: the spool binary plus the filesystem tools it runs
# (mkfs.*, fsck.*, blkid, mount) on the node.

FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=v0.0.0-dev
RUN CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w -X github.com/spool-csi/spool/pkg/version.Version=${VERSION}" \
      -o /out/spool ./cmd/spool

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends e2fsprogs xfsprogs btrfs-progs util-linux mount \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/spool /usr/local/bin/spool
ENTRYPOINT ["/usr/local/bin/spool"]
