# Label Studio ML backend: pupil and eye-corner pre-annotation.
#   docker build -t pupil-backend .
#   docker run -p 9090:9090 -v pupil-models:/data/models pupil-backend
# docker-compose.yml runs it with Label Studio, the training worker and Redis.
# Linted with hadolint (rules: .hadolint.yaml); tests/test_containers.py runs the linter and
# runs this file's CMD and HEALTHCHECK outside Docker, exactly as written here.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=9090 \
    MODEL_DIR=/data/models

WORKDIR /app

# Dependencies first (a layer cached until the lock changes), from the pinned lock only. Every
# wheel in it bundles its native libraries and needs only libc, libstdc++ and zlib from the
# system, which the slim base has: no apt packages.
COPY requirements.lock ./
RUN pip install -r requirements.lock

# The code, then the package's metadata (its version names the code in every model version),
# then a build-time check that the dlib landmark model shipped by face_recognition_models is in
# the image (located with importlib.util.find_spec; nothing is downloaded at run time).
COPY pyproject.toml ./
COPY backend ./backend
COPY label_config ./label_config
RUN pip install --no-deps --no-build-isolation . \
    && rm -rf build ./*.egg-info \
    && python -c "from backend.model_files import dlib_model_path; print(dlib_model_path())"
# The command-line tools, to run in the image: e.g. `docker compose run --rm backend python
# scripts/import_images.py ...` (README) needs no Python on the host.
COPY scripts ./scripts

# A non-root user with a numeric id (so `runAsNonRoot` and the like can check it) that owns
# MODEL_DIR; a named volume mounted there starts with that ownership.
RUN groupadd --gid 10001 app \
    && useradd --no-log-init --create-home --uid 10001 --gid 10001 app \
    && mkdir -p /data/models \
    && chown -R 10001:10001 /data
USER 10001:10001
VOLUME ["/data/models"]
EXPOSE 9090

# Probes http://127.0.0.1:$PORT/health, with BASIC_AUTH_USER/BASIC_AUTH_PASS when they are set
# (every route needs them then). The worker (docker-compose.yml) serves no HTTP: it turns this off.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "backend.healthcheck"]

# gunicorn, configured from the environment (PORT, HOST, WORKERS, THREADS, ...: see README).
CMD ["python", "-m", "backend.server"]
