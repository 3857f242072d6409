# The trainer image: one torchrun node per container (CPU by default; compose/gpu.yml for GPUs).
# The same image runs the in-cluster coordinator (python -m orchestrator.coordinator).
ARG BASE_IMAGE=python:3.11-slim

# Dependencies go into a venv (Debian's python refuses system-wide pip) in a throwaway stage, so
# that the wheelhouse copied in for offline builds never reaches the final image.
FROM ${BASE_IMAGE} AS deps
# auto: install from the wheels when there are some; off: from the index (compose/gpu.yml does,
# since the wheelhouse made here holds the CPU build of torch).
ARG WHEELHOUSE=auto
RUN python3 -m venv /opt/venv
# `wheelhous[e]` matches nothing when there is no wheelhouse/ (online builds): not an error.
COPY pyproject.toml wheelhous[e] /build/
WORKDIR /build
RUN python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["orchestrator"]))' > requirements.txt \
 && if [ "$WHEELHOUSE" != off ] && ls ./*.whl >/dev/null 2>&1; then \
        /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /build -r requirements.txt; \
    else \
        /opt/venv/bin/pip install --no-cache-dir -r requirements.txt; \
    fi

FROM ${BASE_IMAGE}
# bubblewrap: trainer.sandbox's process backend runs model-written code under it.
RUN apt-get update -q && apt-get install -y -q --no-install-recommends bubblewrap \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 trainer
COPY --from=deps /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
WORKDIR /app
COPY trainer/ trainer/
COPY orchestrator/ orchestrator/
COPY configs/ configs/
USER trainer
CMD ["python", "-m", "orchestrator.node"]
