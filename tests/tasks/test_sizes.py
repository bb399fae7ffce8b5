"""Each task knows its training set's size without building it (the launcher asks before it
forks its workers, where a torch operation would leave them hanging)."""

import pytest

from shoal.tasks import TASKS


@pytest.mark.parametrize("name", list(TASKS))
def test_train_samples_is_the_training_sets_length(name):
    assert TASKS[name].train_samples(0) == len(TASKS[name](0).train_dataset())
