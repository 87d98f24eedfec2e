# One image for every Parley service: `parley serve SERVICE` picks the service.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PARLEY_HTTP_ADDR=0.0.0.0:8080 \
    PARLEY_LOG_JSON=true

WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY parley ./parley
RUN pip install --no-cache-dir . && useradd --system --uid 10001 parley

USER 10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["parley"]
CMD ["serve", "auth"]
