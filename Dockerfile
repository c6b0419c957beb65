# The igw image the Kubernetes manifests run (deploy/base: `igw run --no-envoy ...`).
#   docker build -t <registry>/igw:0.1.0 . && docker push <registry>/igw:0.1.0
# (No Docker engine runs on the project's CI machines: this file is not built there.)
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --uid 65532 --no-create-home igw
USER 65532
# ext_proc, gRPC health, Prometheus metrics
EXPOSE 9002 9003 9090
ENTRYPOINT ["igw"]
# The manifests give the arguments (run --no-envoy --pool-name ...).
CMD ["--help"]
