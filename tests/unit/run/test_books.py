"""The run's verdict (trainer.run.books.verdict) from every process's parameter hash."""

from tests.support.paths import REPO
from trainer.config import load_config
from trainer.run.books import verdict

FULL_SYNC = load_config(REPO / "configs" / "test.yaml")
STREAMING = load_config(REPO / "configs" / "test.yaml", ["diloco.fragments=2", "diloco.fragment_alpha=0.5"])


def test_equal_hashes_on_every_rank_are_ok():
    done = verdict(FULL_SYNC, ["ab"] * 4, replica_size=2)
    assert (done["status"], done["reason"], done["replicas_agree"]) == ("ok", "", True)


def test_a_share_lost_inside_a_replica_fails_although_every_replica_s_first_rank_agrees():
    # ranks 0,1 = replica 0; ranks 2,3 = replica 1: rank 3 never received rank 2's synced share
    hashes = ["ab", "ab", "ab", "cd"]
    done = verdict(FULL_SYNC, hashes, replica_size=2)
    assert done["status"] == "failed" and not done["replicas_agree"]
    assert done["reason"] == f"the processes of replica(s) [1] hold different weights: {hashes}"
    # the same, where replicas may differ (Streaming DiLoCo): the processes of one replica still may not
    assert verdict(STREAMING, hashes, replica_size=2)["status"] == "failed"


def test_replicas_that_differ_fail_a_full_sync_and_pass_streaming_diloco():
    hashes = ["ab", "ab", "cd", "cd"]
    done = verdict(FULL_SYNC, hashes, replica_size=2)
    assert (done["status"], done["reason"]) == ("failed", "replicas were expected to agree and do not: ['ab', 'cd']")
    streaming = verdict(STREAMING, hashes, replica_size=2)
    assert (streaming["status"], streaming["replicas_expected_to_agree"], streaming["replicas_agree"]) == (
        "ok",
        False,
        False,
    )
    # one process a replica: each hash is a replica's
    assert verdict(FULL_SYNC, ["ab", "cd"])["status"] == "failed"
