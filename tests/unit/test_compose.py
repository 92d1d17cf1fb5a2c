"""docker-compose.yml cannot run here (no Docker engine); check it agrees with the repo and docs/configuration.md."""
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
PORTS_DOC = (ROOT / "docs/configuration.md").read_text()


def _host_ports(service: dict) -> set[int]:
    return {int(str(p).split(":")[0]) for p in service.get("ports", [])}


def test_services_and_images():
    services = COMPOSE["services"]
    assert set(services) == {"kafka", "redis", "worker", "prometheus", "grafana"}
    pom = (ROOT / "deploy/kafka/pom.xml").read_text()
    kafka_version = re.search(r"<kafka.version>([^<]+)</kafka.version>", pom).group(1)
    assert services["kafka"]["image"] == f"apache/kafka:{kafka_version}", "compose and `make stack` run different Kafkas"
    assert services["redis"]["image"].startswith("redis:")
    assert services["worker"]["build"] == "." and (ROOT / "Dockerfile").exists()
    assert services["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_ports_match_the_documented_table():
    """Every published port is in the ports table of docs/configuration.md, with its service."""
    table = dict(re.findall(r"^\| `?(\w+)`? \| (\d+) \|", PORTS_DOC, flags=re.M))
    for name, service in COMPOSE["services"].items():
        for port in _host_ports(service):
            assert table.get(name) == str(port), f"docs/configuration.md ports table should list {name} on {port}"


def test_prometheus_scrapes_the_worker_port():
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    worker = COMPOSE["services"]["worker"]
    assert f"worker:{worker['environment']['PQL_WEB_PORT']}" in targets
    for mount in COMPOSE["services"]["prometheus"]["volumes"] + COMPOSE["services"]["grafana"]["volumes"]:
        assert (ROOT / mount.split(":")[0]).exists(), mount
