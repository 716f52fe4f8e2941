# lmlab on the CPU: `docker build -t lmlab .`, then
#   docker run --rm -v "$PWD/quickstart:/work/quickstart" lmlab
# runs the quickstart and leaves its data and run folder in ./quickstart (docs/containers.md).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/work/.cache/huggingface

# The README's install command, with PyTorch's CPU index: on Linux the same pin on PyPI is
# the multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/lmlab
COPY . .
RUN pip install -e '.[dev]'

# Runs, data and the Hugging Face cache go under /work: mount a folder there to keep them.
# World-writable, so that `docker run --user "$(id -u):$(id -g)"` can write too.
WORKDIR /work
RUN chmod 1777 /work

CMD ["lmlab", "quickstart", "--out", "/work/quickstart"]
