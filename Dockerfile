# syntax=docker/dockerfile:1
#
# The pipeline's container images: one build stage, then two images that run as the
# unprivileged user `pipeline` (uid 10001), both with git (the server keeps the canonical
# repository, the runner a mirror and its worktrees):
#
#   docker build --target runner -t pipeline-runner .
#   docker build --target server -t pipeline-server .
#
# The runner image starts `pipeline-runner --once` by default: it takes one task, finishes it
# and exits 0 (verified), 3 (the task's own failure) or 4 (no result taken), the shape that
# autoscalers starting a container per job expect. It has no agent: build your own image
# `FROM pipeline-runner` that installs one (claude, codex, aider or your command) and set
# PIPELINE_AGENT / PIPELINE_AGENT_CMD, PIPELINE_SERVER and the registration token
# (PIPELINE_RUNNER_TOKEN, or a file through --token-file). See README.md, "Installing and
# deploying".
#
# Not built by CI: the project's machines have no container engine, so this file was checked
# by hand (every path it copies is made by the build stage; the user is made before USER
# names it; the binaries' names are the workspace's [[bin]] names).

ARG RUST_VERSION=1.88
ARG DEBIAN=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin pipeline-server --bin pipeline-runner --bin pipelinectl \
    && mkdir -p /out/bin /out/share/man/man1 /out/share/bash-completion/completions \
    && cp target/release/pipeline-server target/release/pipeline-runner \
          target/release/pipelinectl /out/bin/ \
    && for b in pipeline-server pipeline-runner pipelinectl; do \
           /out/bin/$b --generate-man /out/share/man/man1 >/dev/null \
           && /out/bin/$b --generate-completions bash \
              > /out/share/bash-completion/completions/$b; \
       done

FROM debian:${DEBIAN}-slim AS base
# tini reaps what agents and builds leave behind when the runner is PID 1, and passes
# SIGTERM on (a runner drains on it).
RUN apt-get update \
    && apt-get install -y --no-install-recommends git ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --create-home \
       --home-dir /var/lib/pipeline --shell /usr/sbin/nologin pipeline
COPY --from=build /out/bin/ /usr/local/bin/
COPY --from=build /out/share/ /usr/local/share/
USER pipeline
WORKDIR /var/lib/pipeline
STOPSIGNAL SIGTERM

FROM base AS runner
ENV PIPELINE_RUNNER_WORK_DIR=/var/lib/pipeline/work
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/pipeline-runner"]
CMD ["--once"]

FROM base AS server
# The repository and the state dir live on the volume; a listener on all interfaces needs
# TLS (PIPELINE_TLS_CERT, PIPELINE_TLS_KEY) or, on a network you trust, PIPELINE_INSECURE=1.
ENV PIPELINE_REPO=/var/lib/pipeline/repo.git \
    PIPELINE_STATE_DIR=/var/lib/pipeline/state \
    PIPELINE_LISTEN=0.0.0.0:50051
VOLUME ["/var/lib/pipeline"]
EXPOSE 50051
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/pipeline-server"]
