# sluice in a container.
#
#   docker build -t sluice .
#   docker run --rm -p 8080:8080 -v /path/to/sluice.toml:/etc/sluice/sluice.toml:ro sluice
#
# io_uring and container seccomp profiles: Docker's default seccomp profile (since Docker
# 25) and containerd's RuntimeDefault (since 2.0) deny io_uring_setup, io_uring_enter and
# io_uring_register with EPERM. Under them `driver = "auto"` finds io_uring unavailable and
# runs every worker on epoll, logging once at start
#   driver=epoll reason="io_uring unavailable: ... Operation not permitted ..."
# (the same behaviour and the same test suite; the README's Performance section compares the
# two drivers), while `driver = "uring"` refuses to start, saying why. To use io_uring in a container, run
# it with a seccomp profile that allows those three calls (Docker's default profile plus
# them), e.g. `--security-opt seccomp=/etc/docker/seccomp-io_uring.json`; the host's
# `kernel.io_uring_disabled` sysctl must be 0 as well.
#
# The shipped config listens on 127.0.0.1: mount your own, listening on 0.0.0.0 or the
# container's address. sluice starts as root in the container, binds its listeners and
# drops to the `sluice` user (`[engine] user`); `docker stop` sends SIGTERM, which drains
# sessions for `engine.shutdown_timeout` (give `docker stop -t` more than that).

FROM rust:1.85-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p sluice

FROM debian:bookworm-slim
RUN useradd --system --user-group --no-create-home --shell /usr/sbin/nologin sluice \
    && install -d -o sluice -g sluice -m 0750 /var/log/sluice /var/lib/sluice \
    && install -d -m 0755 /etc/sluice /run/sluice
COPY --from=build /src/target/release/sluice /usr/bin/sluice
COPY dist/sluice.toml /etc/sluice/sluice.toml
RUN ["/usr/bin/sluice", "check", "--config", "/etc/sluice/sluice.toml"]
EXPOSE 8080 9900
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/sluice"]
CMD ["run", "--config", "/etc/sluice/sluice.toml"]
