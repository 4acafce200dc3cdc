# The AvatarForcing Serve image (the Helm chart in helm/avatarforcing runs it):
#   docker build -t avatarforcing-serve:0.1.0 .
# On a linux/amd64 build the torch wheel from PyPI carries its own CUDA runtime, so the image runs on
# NVIDIA GPU nodes (the NVIDIA container runtime provides the driver) and on CPU-only nodes alike.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the two packages need (no .venv, .tools, out/ from a developer's tree).
COPY pyproject.toml README.md LICENSE ./
COPY proto/python ./proto/python
COPY clients/python ./clients/python
COPY avatarforcing ./avatarforcing
COPY service ./service
COPY tools ./tools
RUN pip install ./proto/python ./clients/python ".[hopper]" \
    && useradd --uid 10001 --user-group --home-dir /tmp --no-create-home --shell /usr/sbin/nologin avatarforcing

# Non-root (the chart's securityContext runs as 10001 with a read-only root filesystem and /tmp as an
# emptyDir); HOME points at /tmp for the caches.
USER 10001:10001
ENV HOME=/tmp
WORKDIR /tmp
EXPOSE 50051 9464
ENTRYPOINT ["avatarforcing", "serve", "--host", "0.0.0.0"]
