"""`trainer.batching.pad_sequences`: the one padding rule every batch uses."""

from trainer.objective.batching import pad_sequences


def test_pad_left_and_right():
    ids, mask = pad_sequences([[1, 2, 3], [4]], 0, left=True)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_sequences([[1, 2, 3], [4]], 0, left=False)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
