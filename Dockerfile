# Label Studio ML backend: pupil and eye-corner pre-annotation.
# Build: docker build -t pupil-backend .   Run: docker run -p 9090:9090 pupil-backend
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=9090 \
    MODEL_DIR=/data/models

WORKDIR /app

# Dependencies first (cached layer), from the pinned lock only.
COPY requirements.lock ./
RUN pip install -r requirements.lock

COPY pyproject.toml README.md ./
COPY backend ./backend
COPY label_config ./label_config
RUN pip install --no-deps --no-build-isolation . \
    && python -c "from backend.model_files import dlib_model_path; print(dlib_model_path())"

RUN useradd --create-home --uid 10001 app \
    && mkdir -p /data/models && chown -R app:app /data
USER app
VOLUME ["/data/models"]
EXPOSE 9090

HEALTHCHECK --interval=30s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\", \"9090\")}/health', timeout=2)"]

# gunicorn, configured from the environment (PORT, WORKERS, THREADS): see README.
CMD ["python", "-m", "backend.server"]
