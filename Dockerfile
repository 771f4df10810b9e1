# One image for the API and the GPU workers (untested here: this machine runs no Docker engine).
#   API:    docker run IMAGE                      (antidote serve on 0.0.0.0:8000; set ANTIDOTE_* for prod)
#   worker: docker run --gpus 1 IMAGE antidote worker
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# PyPI's default torch wheel is the CUDA build on x86_64 (what GPU workers need). For a smaller CPU-only
# API image: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_URL=
RUN pip install "torch>=2.10" "torchvision>=0.25" ${TORCH_INDEX_URL:+--index-url ${TORCH_INDEX_URL}}

COPY pyproject.toml README.md ./
COPY api ./api
COPY cli ./cli
COPY core ./core
COPY migrations ./migrations
COPY store ./store
COPY worker ./worker
RUN pip install ".[influence]" && useradd --create-home --uid 10001 antidote && mkdir -p /data && chown antidote /data

USER antidote
ENV ANTIDOTE_DATA_DIR=/data
EXPOSE 8000
CMD ["antidote", "serve", "--host", "0.0.0.0", "--port", "8000"]
