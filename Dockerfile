# maskx for GPU runs: CUDA runtime base + uv, installed from uv.lock.
#
#   docker build -t maskx .
#   docker run --gpus all --ipc=host -v "$PWD/data:/data" -v "$PWD/runs:/runs" maskx detect-train --config coco_voc_r50 ...
#
# The PyTorch wheels in uv.lock carry their own CUDA libraries; the host needs an NVIDIA driver
# recent enough for them and the NVIDIA Container Toolkit. See docs/deploy.md.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_IMAGE}

COPY --from=uv /uv /uvx /usr/local/bin/

# uv installs its own Python 3.11 and the locked packages into /opt/maskx/.venv; bytecode is
# compiled at build time so that start-up (torch's import) is fast.
ENV UV_PYTHON=3.11 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_PROJECT_ENVIRONMENT=/opt/maskx/.venv \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    PYTHONUNBUFFERED=1

WORKDIR /opt/maskx

# Dependencies first (a layer that survives source edits), then the project itself.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    uv sync --frozen --no-dev --no-install-project

COPY pyproject.toml uv.lock README.md ./
COPY pipelines ./pipelines
COPY maskx_cli ./maskx_cli
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable

# Run as an unprivileged user; data and runs are volumes (pass --user "$(id -u):$(id -g)" to write
# into host folders as yourself). HOME and caches live in /tmp so that any --user works.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin maskx \
    && mkdir -p /data /runs \
    && chown 10001:10001 /data /runs
ENV PATH=/opt/maskx/.venv/bin:$PATH \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCH_HOME=/tmp/torch
USER 10001:10001
VOLUME ["/data", "/runs"]
WORKDIR /runs

ENTRYPOINT ["maskx"]
CMD ["--help"]
