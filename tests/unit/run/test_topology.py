"""Who is who in an elastic run: the environment a replica needs, refused in one line naming it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from torch.distributed import TCPStore

from trainer.config import Config, ConfigError, DebugConfig, DiLoCoConfig
from trainer.run import topology
from trainer.run.topology import init_distributed

ELASTIC = Config(diloco=DiLoCoConfig(elastic=True))


@pytest.fixture()
def environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "COMPOSER_ELASTIC_STORE", "COMPOSER_REPLICA_ID", "COMPOSER_REPLICAS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("missing", ["COMPOSER_ELASTIC_STORE", "COMPOSER_REPLICA_ID", "COMPOSER_REPLICAS"])
def test_an_elastic_replica_without_its_store_id_or_count_is_refused_naming_the_variable(environment, missing):
    values = {"COMPOSER_ELASTIC_STORE": "127.0.0.1:1", "COMPOSER_REPLICA_ID": "0", "COMPOSER_REPLICAS": "2"}
    for name, value in values.items():
        if name != missing:
            environment.setenv(name, value)
    with pytest.raises(ConfigError, match=f"diloco.elastic: set {missing}"):
        init_distributed(ELASTIC)


def test_an_elastic_replica_of_several_processes_or_outside_the_count_is_refused(environment):
    environment.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="a replica is one process"):
        init_distributed(ELASTIC)
    environment.setenv("WORLD_SIZE", "1")
    environment.setenv("COMPOSER_ELASTIC_STORE", "127.0.0.1:1")
    environment.setenv("COMPOSER_REPLICA_ID", "3")
    environment.setenv("COMPOSER_REPLICAS", "3")
    with pytest.raises(ConfigError, match="COMPOSER_REPLICA_ID 3 is not one of 3 replicas"):
        init_distributed(ELASTIC)


def test_an_elastic_replica_is_a_world_of_its_own_on_the_runs_store(environment):
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    environment.setenv("COMPOSER_ELASTIC_STORE", f"127.0.0.1:{server.port}")
    environment.setenv("COMPOSER_REPLICA_ID", "2")
    environment.setenv("COMPOSER_REPLICAS", "3")
    topo = init_distributed(ELASTIC)
    assert (topo.world_size, topo.replicas, topo.replica_id, topo.rank, topo.lead) == (1, 3, 2, 0, True)
    assert topo.global_rank == 2 and topo.replica_size == 1 and topo.elastic is not None
    assert topo.elastic.agree("run_dir", "runs/a") == "runs/a" and topo.elastic.agree("run_dir", "runs/b") == "runs/a"
    assert topo.elastic.once("kill/2/5") and not topo.elastic.once("kill/2/5")


def test_an_elastic_run_asking_more_replicas_than_it_has_or_killing_one_it_lacks_is_refused_by_key(environment):
    environment.setenv("COMPOSER_ELASTIC_STORE", "127.0.0.1:1")
    environment.setenv("COMPOSER_REPLICA_ID", "0")
    environment.setenv("COMPOSER_REPLICAS", "3")
    with pytest.raises(ConfigError, match=r"diloco.min_replicas: 5 is more than the run's 3 replicas"):
        init_distributed(Config(diloco=DiLoCoConfig(elastic=True, min_replicas=5)))
    with pytest.raises(ConfigError, match=r"debug.kill_replica_at: replica 9 is not one of the run's 3 replicas"):
        init_distributed(Config(diloco=DiLoCoConfig(elastic=True), debug=DebugConfig(kill_replica_at=[9, 5])))


def test_an_elastic_store_address_nobody_answers_is_one_error_naming_the_variable(environment):
    environment.setattr(topology, "FIRST_CONNECT_S", 1.0)
    environment.setenv("COMPOSER_ELASTIC_STORE", "127.0.0.1:1")  # nothing listens on port 1
    environment.setenv("COMPOSER_REPLICA_ID", "0")
    environment.setenv("COMPOSER_REPLICAS", "2")
    with pytest.raises(ConfigError, match=r"COMPOSER_ELASTIC_STORE: no store answered at 127.0.0.1:1 within 1 s"):
        init_distributed(ELASTIC)
