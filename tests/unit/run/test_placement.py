"""`trainer.run_dir`: a finished run is never resumed; an unfinished one only with its own config."""

import json

import pytest

from trainer.config import ConfigError, dump_config, load_config
from trainer.run.placement import check_resumable, choose_run_dir, config_differences


def finish(path):
    path.mkdir(parents=True, exist_ok=True)
    (path / "summary.json").write_text("{}")


def test_a_finished_run_directory_is_skipped_for_the_next_free_one(tmp_path):
    base = tmp_path / "smoke"
    assert choose_run_dir(base) == base  # nothing there yet
    finish(base)
    finish(tmp_path / "smoke-2")
    (tmp_path / "smoke-3").mkdir()  # an unfinished run: it is the one to resume
    assert choose_run_dir(base) == tmp_path / "smoke-3"


def test_config_differences_name_every_changed_dotted_key_but_resume():
    a = {"rounds": 3, "optim": {"lr": 1e-3, "sft_steps": 20}, "resume": "auto"}
    b = {"rounds": 3, "optim": {"lr": 5e-1, "sft_steps": 20}, "resume": "changed", "eval": {"size": 4}}
    assert config_differences(a, b) == ["eval.size", "optim.lr"]


def test_an_unfinished_run_resumes_only_with_its_config_and_world_size(tmp_path):
    saved = dump_config(load_config("configs/test.yaml"))
    (tmp_path / "config.json").write_text(json.dumps(saved))
    check_resumable(tmp_path, saved, resume="auto", replicas=2, saved_replicas=2)  # same: fine
    changed = dump_config(load_config("configs/test.yaml", ["optim.lr=0.5"]))
    with pytest.raises(ConfigError, match=r"other values for optim\.lr; .*--set resume=changed"):
        check_resumable(tmp_path, changed, resume="auto", replicas=2, saved_replicas=2)
    check_resumable(tmp_path, changed, resume="changed", replicas=2, saved_replicas=2)  # on purpose
    with pytest.raises(ConfigError, match="saved by 2 replicas and this run has 8"):
        check_resumable(tmp_path, saved, resume="changed", replicas=8, saved_replicas=2)
