# The pql worker image used by docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY detectors detectors
COPY streams streams
COPY examples examples
RUN pip install --no-cache-dir '.[rocksdb]'
ENV PQL_RULES=/app/examples/rules.yaml
EXPOSE 6066
CMD ["pql", "worker"]
