"""``shoal coordinator --state``'s file: an append-only log that a restart reads back."""

import pytest

from shoal.config import ConfigError
from shoal.coordinator import Membership
from shoal.coordinator.state_file import StateFile


def test_the_log_gives_back_the_last_state_and_every_commit_even_when_torn(tmp_path):
    path = tmp_path / "state.jsonl"
    membership = Membership(expected_workers=2, min_workers=1)
    kept = StateFile(str(path), "token")
    kept.start(membership.export_state(), membership.commits_by_worker())
    membership.keep_state_with(kept.keep_state, kept.keep_commits)
    membership.join(0, "h", 1)
    membership.join(1, "h", 2)  # forms generation 1: a state line
    membership.heartbeat(0, {"commits": [[0, 1, 5.0, 0.25]]})
    membership.heartbeat(1, {"commits": [[0, 1, 5.5, 0.5]]})
    kept.close()
    with path.open("a") as handle:
        handle.write('{"commits": [1, [[1, 1, 6.0')  # killed mid-write
    loaded = StateFile(str(path), "token")
    state, commits = loaded.load()
    loaded.close()
    assert state["generations"] == [{"number": 1, "members": [0, 1], "formed_at": state["generations"][0]["formed_at"],
                                    "collective_timeout": 5.0, "step_timeout": 5.0}]
    assert commits == [(0, [[0, 1, 5.0, 0.25]]), (1, [[0, 1, 5.5, 0.5]])]
    # A coordinator started on it rewrites it compacted, whole again
    restored = Membership(expected_workers=2, min_workers=1)
    restored.restore_state(state, commits)
    again = StateFile(str(path), "token")
    again.start(restored.export_state(), restored.commits_by_worker())
    again.close()
    compacted = Membership(expected_workers=2, min_workers=1)
    loaded = StateFile(str(path), "token")
    compacted.restore_state(*loaded.load())
    loaded.close()
    assert compacted.record().to_json() == restored.record().to_json()
    assert restored.record().losses == {0: 0.75} and restored.record().steps[0].committed_at == 5.0
    assert len(path.read_text().splitlines()) == 4  # header, state, a batch per worker


def test_one_coordinator_at_a_time_holds_the_file(tmp_path):
    """A second coordinator started on the same file by mistake stops before it reads it;
    once the first is gone (closed here; killed, the kernel lets go of its lock) it may."""
    path = str(tmp_path / "state.jsonl")
    first = StateFile(path, "token")
    assert first.load() is None
    with pytest.raises(ConfigError, match="in use by another coordinator"):
        StateFile(path, "token").load()
    first.close()
    second = StateFile(path, "token")
    assert second.load() is None
    second.close()
