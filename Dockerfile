# Two targets from one file: `coordinator` (the coordinator and the clients: no torch) and
# `worker` (the renderer: torch, diffusers). compose.yaml builds each service from its target.
FROM python:3.11-slim AS base

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the package build needs; copying `.` would drag in .venv and out/.
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY coordinator ./coordinator
COPY worker ./worker

FROM base AS coordinator
RUN pip install . && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"
WORKDIR /
CMD ["clipmesh", "coordinator", "--help"]

FROM python:3.11-slim AS worker
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, in its own layer, so code edits don't re-download gigabytes.
# On Linux x86_64 the plain PyPI torch wheel is the CUDA build (it pulls the nvidia-* runtime
# wheels), which is what the GPU workers need; the host only supplies the driver through the
# NVIDIA Container Toolkit. For a CPU-only image:
#   docker build --target worker --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
ARG TORCH_SPEC="torch>=2.6,<2.15"
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
WORKDIR /src
COPY --from=base /src /src
RUN pip install ".[worker]"
WORKDIR /
CMD ["clipmesh", "worker", "--help"]
