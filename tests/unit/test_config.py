"""The config fails early and points at the file, line and key."""

import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO
from trainer.config import Config, ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


SHIPPED = sorted(path.name for path in (REPO / "configs").iterdir() if path.is_file())


def test_every_file_in_configs_is_a_yaml_config_the_next_test_validates():
    assert len(SHIPPED) >= 6 and all(name.endswith(".yaml") for name in SHIPPED), SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_validates_as_the_make_targets_check_it(name):
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


# ----------------------------------------------------------------------------- metrics.sinks (issue 28)


def test_metrics_sinks_default_to_jsonl_and_jsonl_stays_on_whatever_is_listed(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    path = write(tmp_path, "name: x\n")
    assert load_config(path).metrics.sinks == ["jsonl"]
    assert load_config(path, ["metrics.sinks=[tensorboard]"]).metrics.sinks == ["jsonl", "tensorboard"]
    both = load_config(path, ["metrics.sinks=[wandb, jsonl, tensorboard]"]).metrics.sinks
    assert both == ["wandb", "jsonl", "tensorboard"]


def test_an_unknown_or_repeated_sink_is_one_line_naming_metrics_sinks_and_its_line(tmp_path):
    path = write(tmp_path, "name: x\nmetrics:\n  sinks: [jsonl, tb]\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == f"{path}:3: metrics.sinks[1]: must be one of 'jsonl', 'tensorboard', 'wandb', got 'tb'"
    path = write(tmp_path, "name: x\nmetrics:\n  sinks: [jsonl, jsonl]\n")
    with pytest.raises(ConfigError, match=r"run.yaml:3: metrics.sinks: names a sink twice"):
        load_config(path)


@pytest.mark.parametrize("sink", ["tensorboard", "wandb"])
def test_a_sink_whose_package_is_not_installed_is_refused_at_config_time(tmp_path, monkeypatch, sink):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setitem(sys.modules, sink, None)  # `import <sink>` now fails, as where it is not installed
    path = write(tmp_path, f"name: x\nmetrics:\n  sinks: [jsonl, {sink}]\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    said = str(error.value)
    assert said.startswith(f"{path}:3: metrics.sinks: {sink}: the {sink} package is not installed;")
    assert "pip install '.[metrics]'" in said and "\n" not in said


def test_wandb_neither_logged_in_nor_offline_is_refused_at_config_time(tmp_path, monkeypatch):
    for variable in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(variable, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))  # no such file yet: this machine never ran `wandb login`
    path = write(tmp_path, "name: x\nmetrics:\n  sinks: [jsonl, wandb]\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path}:3: metrics.sinks: wandb: W&B is not logged in and not offline;")
    assert "WANDB_MODE=offline" in str(error.value) and "\n" not in str(error.value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert load_config(path).metrics.sinks == ["jsonl", "wandb"]
    monkeypatch.delenv("WANDB_MODE")
    netrc.write_text("machine api.wandb.ai\n  login user\n  password not-a-real-key\n")  # what `wandb login` writes
    netrc.chmod(0o600)
    assert load_config(path).metrics.sinks == ["jsonl", "wandb"]
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a key for another host is no login here
    with pytest.raises(ConfigError, match="W&B is not logged in"):
        load_config(path)
    monkeypatch.setenv("WANDB_API_KEY", "not-a-real-key")
    assert load_config(path).metrics.sinks == ["jsonl", "wandb"]
