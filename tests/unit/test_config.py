"""The config fails early and points at the file, line and key."""

from pathlib import Path

import pytest

from tests.support.paths import REPO
from trainer.config import Config, ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["smoke.yaml", "test.yaml", "qwen05b.yaml", "llama3-8b.yaml"])
def test_shipped_configs_load(name):
    config = load_config(REPO / "configs" / name)
    assert isinstance(config, Config)
    assert config.name == Path(name).stem


def test_values_and_overrides(tmp_path):
    path = write(tmp_path, "name: x\nrounds: 3\noptim:\n  lr: 1e-4\ndiloco:\n  sync_every: 8\n")
    config = load_config(path, ["diloco.sync_every=2", "loss.alpha=0", "task.traces=/data"])
    assert (config.rounds, config.optim.lr, config.diloco.sync_every) == (3, 1e-4, 2)
    assert config.loss.alpha == 0.0 and isinstance(config.loss.alpha, float)
    assert config.task.traces == "/data"
    assert config.diloco.outer_lr == 0.7 and config.diloco.outer_momentum == 0.9  # the DiLoCo defaults


@pytest.mark.parametrize(
    "text, line, key",
    [
        ("name: x\ndiloco:\n  sync_every: 0\n", 3, "diloco.sync_every"),
        ("name: x\nloss:\n  alpha: -0.5\n", 3, "loss.alpha"),
        ("name: x\nrollout:\n  group_size: 1\n", 3, "rollout.group_size"),
        ("name: x\nmodel:\n  hidden: 64\n", 3, "model.hidden"),
        ("name: x\nrounds: many\n", 2, "rounds"),
        ("name: x\nparallel:\n  sharding: zero3\n", 3, "parallel.sharding"),
        ("name: x\nparallel:\n  activation_checkpointing: 2\n", 3, "parallel.activation_checkpointing"),
        ("name: x\ndiloco:\n  backup_device: gpu\n", 3, "diloco.backup_device"),
        ("name: x\ndiloco:\n  compression: zip\n", 3, "diloco.compression"),
        ("name: x\ndiloco:\n  sync_every: 6\n  fragments: 4\n", 4, "diloco.fragments"),
        ("loss: 3\n", 1, "loss"),
        ("name: x\nloss:\n  sdpo_on: passed\n", 3, "loss.sdpo_on"),
        (
            "name: x\ntask:\n  source: agent_code_arith\nloss:\n  sdpo_on: failed\nagent:\n  enabled: true\n",
            5,
            "loss.sdpo_on",
        ),
        (
            "name: x\ntask:\n  source: agent_code_arith\n  hint_level: sibling\nagent:\n  enabled: true\n",
            4,
            "task.hint_level",
        ),
    ],
)
def test_bad_values_name_file_line_and_key(tmp_path, text, line, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}:{line}: {key}:"), message
    assert "\n" not in message


def test_bad_override_names_key(tmp_path):
    path = write(tmp_path, "name: x\n")
    with pytest.raises(ConfigError, match=r"rollout\.group_size: must be >= 2"):
        load_config(path, ["rollout.group_size=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["rounds"])


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    path = write(tmp_path, "name: x\nrounds: [1,\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: not valid YAML"):
        load_config(path)
