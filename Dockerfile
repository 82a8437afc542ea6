# The example workers and producers of the dev stack (docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# Dependencies first, so that editing workers/ does not reinstall them.
COPY pyproject.toml README.md ./
COPY workerkit ./workerkit
RUN pip install .

COPY workers ./workers
ENV PYTHONPATH=/app
RUN mkdir /data && chown nobody /data
USER nobody
CMD ["workerkit", "--help"]
