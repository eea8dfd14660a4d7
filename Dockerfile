# The image the k8s/ manifests name: CUDA runtime, the project and its pinned dependencies, a non-root user.
#   docker build -t ghcr.io/guidedmix/guidedmix:0.1.0 .
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    DS_ACCELERATOR=cuda \
    TORCH_EXTENSIONS_DIR=/opt/torch_extensions \
    PATH=/opt/venv/bin:$PATH

# g++ and ninja: DeepSpeed JIT-builds its ops; tini reaps Ray's child processes
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ ninja-build tini ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 1000 guidedmix && useradd --uid 1000 --gid 1000 --create-home guidedmix
WORKDIR /app

# dependencies first (a layer that survives code edits), then the project
COPY pyproject.toml constraints.txt README.md ./
RUN python3 -m venv /opt/venv \
 && pip install --upgrade pip \
 && pip install --index-url "$TORCH_INDEX" "$TORCH_SPEC"
COPY shards shards
COPY trainer trainer
COPY launch launch
COPY configs configs
RUN pip install -c constraints.txt ".[mlflow]" \
 && mkdir -p "$TORCH_EXTENSIONS_DIR" && chown guidedmix:guidedmix "$TORCH_EXTENSIONS_DIR"

USER 1000:1000
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["guidedmix", "--help"]
