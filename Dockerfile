# selfdistill image: runs the pipeline (`dvc repro`) on the embedded default, through the
# same install path as `make` (make install), as a non-root user.
#   docker build -t selfdistill .
#   docker run --rm selfdistill                      # dvc repro, then prints the report
# torch==2.13.0 is pinned; to get its CPU build in the image, pass the CPU wheel index:
#   docker build --build-arg PIP_EXTRA_INDEX_URL=<your torch CPU index> -t selfdistill .
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends git make bubblewrap g++ \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 selfdistill
USER selfdistill
WORKDIR /home/selfdistill/app

ARG PIP_EXTRA_INDEX_URL=
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PATH=/home/selfdistill/app/.venv/bin:$PATH

# Dependencies first, so editing stage code doesn't reinstall torch.
COPY --chown=selfdistill:selfdistill pyproject.toml Makefile README.md ./
COPY --chown=selfdistill:selfdistill tasks/__init__.py tasks/__init__.py
COPY --chown=selfdistill:selfdistill flows/__init__.py flows/__init__.py
RUN make install PYTHON=python3.11

COPY --chown=selfdistill:selfdistill . .
RUN git config --global user.email selfdistill@localhost && git config --global user.name selfdistill \
    && (git rev-parse --git-dir >/dev/null 2>&1 || (git init -q && git add -A && git commit -qm image))

# Docker often forbids the user namespaces bubblewrap needs; the sandbox then falls back to
# a weaker isolation level, warns, and records it in every metrics file. For full isolation:
#   docker run --security-opt seccomp=unconfined --security-opt apparmor=unconfined ...
CMD ["sh", "-c", "selfdistill validate && dvc repro && cat report/summary.md"]
