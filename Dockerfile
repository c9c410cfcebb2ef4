# The collector's image: every long-running part (streams, worker, beat, web, flower) runs from it
# with a different command; see docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so a code change does not reinstall them.
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY pyproject.toml celeryconfig.py ./
COPY collector ./collector
RUN pip install --no-deps . && rm -rf build ./*.egg-info

# Run as an unprivileged user; /data holds alert.log and the beat schedule, /data/var/spill the
# stream process's spill (volumes in compose: made here so a new named volume is the user's).
RUN useradd --system --create-home --uid 10001 collector \
    && mkdir -p /data/var/spill \
    && chown -R collector:collector /data
USER collector
WORKDIR /data
ENV ALERT_LOG=/data/alert.log

EXPOSE 8000 5555
CMD ["collector", "--help"]
