"""Hand-computed tests for rlhfkit.core.masks."""

import torch

from rlhfkit.core import first_true_index, has_eos, last_token_index, response_mask, sequence_lengths


def test_first_true_index_returns_length_when_none():
    bools = torch.tensor([[False, True, True], [False, False, False], [True, False, True]])
    assert first_true_index(bools).tolist() == [1, 3, 0]
    # along dim 0: columns [F, F, T], [T, F, F], [T, F, T] -> [2, 0, 0]
    assert first_true_index(bools, dim=0).tolist() == [2, 0, 0]


def test_response_mask_stops_after_first_eos():
    eos = 2
    ids = torch.tensor(
        [
            [5, 2, 7, 2],  # EOS at 1; the 2 at index 3 comes after it and is ignored -> [1, 1, 0, 0]
            [5, 6, 7, 8],  # no EOS: truncated, all real -> [1, 1, 1, 1]
            [2, 0, 0, 0],  # EOS first -> [1, 0, 0, 0]
            [4, 4, 4, 2],  # EOS last -> [1, 1, 1, 1]
        ]
    )
    expected = [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]
    mask = response_mask(ids, eos)
    assert mask.tolist() == expected
    assert mask.dtype == torch.long


def test_response_mask_respects_lengths():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    # lengths cut row 1 at 2 tokens; row 0's EOS (end 2) comes before its length 4; row 2 length 1
    mask = response_mask(ids, 2, lengths=torch.tensor([4, 2, 1]))
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]]
    # a length shorter than the EOS position wins: row [5, 6, 2] with length 1 -> [1, 0, 0]
    assert response_mask(torch.tensor([[5, 6, 2]]), 2, lengths=torch.tensor([1])).tolist() == [[1, 0, 0]]


def test_response_mask_several_stop_ids():
    ids = torch.tensor([[5, 9, 2, 7], [2, 9, 9, 9]])
    # stop ids {2, 9}: row 0 stops at 9 (index 1), row 1 at 2 (index 0)
    assert response_mask(ids, [2, 9]).tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]


def test_has_eos():
    ids = torch.tensor([[5, 2, 0], [5, 6, 7], [5, 6, 2]])
    assert has_eos(ids, 2).tolist() == [True, False, True]
    # the EOS of row 2 sits at index 2, outside its length 2
    assert has_eos(ids, 2, lengths=torch.tensor([3, 3, 2])).tolist() == [True, False, False]


def test_sequence_lengths():
    assert sequence_lengths(torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 0]])).tolist() == [2, 2, 0]


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor(
        [
            [1, 1, 0, 0],  # right padded -> 1
            [0, 0, 1, 1],  # left padded -> 3 (lengths - 1 would wrongly give 1)
            [1, 1, 1, 1],  # full -> 3
            [0, 1, 1, 0],  # both sides -> 2
            [0, 0, 0, 0],  # empty -> -1
        ]
    )
    assert last_token_index(mask).tolist() == [1, 3, 3, 2, -1]
    assert last_token_index(mask.bool()).tolist() == [1, 3, 3, 2, -1]
