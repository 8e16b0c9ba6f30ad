# One chatcluster node. Configuration comes from the environment (CHAT_*; docs/operations.md).
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY node ./node
RUN pip install . && useradd --system --uid 10001 --no-create-home chat

USER chat
ENV CHAT_HOST=0.0.0.0 \
    CHAT_WS_PORT=8000 \
    CHAT_HTTP_PORT=8001 \
    CHAT_LOG_FORMAT=json
EXPOSE 8000 8001

# SIGTERM drains (readyz 503, clients told to reconnect, closes spread over CHAT_DRAIN_SECONDS):
# give the container a stop timeout above that window (compose: stop_grace_period).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CHAT_HTTP_PORT', '8001'), timeout=2)"]

ENTRYPOINT ["chatcluster"]
CMD ["node"]
