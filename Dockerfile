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

# Uses PORT and, when set, BASIC_AUTH_USER/BASIC_AUTH_PASS (every route needs them then).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "backend.healthcheck"]

# gunicorn, configured from the environment (PORT, WORKERS, THREADS): see README.
CMD ["python", "-m", "backend.server"]
