# The moe-cluster image for KubeRay: the official Ray image whose Ray is the manifests' rayVersion, with the
# project (its generated gRPC code included) and the demo checkpoint the cpu-demo overlay serves (the trained one,
# shipped in the package: cluster/demo_model).
#   docker build -t moe-cluster:0.1.0-cpu .                     # rayproject/ray:2.60.0-py311, CPU torch
#   docker build --build-arg GPU=1 -t moe-cluster:0.1.0-gpu .   # rayproject/ray:2.60.0-py311-gpu, CUDA torch
# RAY_VERSION must equal rayVersion in k8s/base/rayservice.yaml (tests/test_k8s.py checks both against Ray).
ARG RAY_VERSION=2.60.0
ARG PYTHON=py311
ARG GPU=
FROM rayproject/ray:${RAY_VERSION}-${PYTHON}${GPU:+-gpu}
ARG RAY_VERSION
ARG GPU
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

WORKDIR /home/ray/moe-cluster
COPY --chown=1000:100 pyproject.toml README.md constraints-cpu.txt ./
COPY --chown=1000:100 cluster/ cluster/
COPY --chown=1000:100 workers/ workers/
COPY --chown=1000:100 router_service/ router_service/
COPY --chown=1000:100 protos/ protos/

# The image's Ray stays as it is (pinned); torch is the version constraints-cpu.txt pins, a CPU build unless GPU.
RUN echo "ray==${RAY_VERSION}" > /tmp/ray-pin.txt \
 && if [ -n "${GPU}" ]; then \
      pip install --no-cache-dir -c /tmp/ray-pin.txt -c constraints-cpu.txt ".[gpu]"; \
    else \
      pip install --no-cache-dir -c /tmp/ray-pin.txt -c constraints-cpu.txt --extra-index-url "${TORCH_CPU_INDEX}" .; \
    fi \
 && rm /tmp/ray-pin.txt \
 && python -c "import ray, sys; sys.exit(ray.__version__ != '${RAY_VERSION}' and f'Ray {ray.__version__} installed')" \
 && python -c "import importlib; from router_service.serve_config import grpc_servicer_functions as fns; \
[getattr(importlib.import_module(f.rsplit('.', 1)[0]), f.rsplit('.', 1)[1]) for f in fns()]"

USER root
RUN mkdir -p /opt/moe-cluster && chown 1000:100 /opt/moe-cluster
USER 1000
RUN moe-cluster init-demo /opt/moe-cluster/demo

WORKDIR /home/ray
