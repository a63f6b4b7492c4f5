# One image for both daemons: `clipmesh coordinator` and `clipmesh worker` (see compose.yaml).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, in its own layer, so code edits don't re-download gigabytes.
# On Linux x86_64 the plain PyPI torch wheel is the CUDA build (it pulls the nvidia-* runtime
# wheels), which is what the GPU workers need; the host only supplies the driver through the
# NVIDIA Container Toolkit. For a CPU-only image:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
ARG TORCH_SPEC="torch>=2.5,<2.15"
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"

WORKDIR /src
# Only what the package build needs; copying `.` would drag in .venv and out/.
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY coordinator ./coordinator
COPY worker ./worker
RUN pip install .

WORKDIR /
CMD ["clipmesh", "--help"]
