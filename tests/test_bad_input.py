"""Bad input gets a clear error and loses nothing (issue 13's list grows here)."""

from __future__ import annotations

import pytest
import torch

from engram.nn.memory import MultiHeadEmbedding
from engram.storage.tables import HostMultiHeadEmbedding


@pytest.mark.parametrize("storage", ["memory", "host"])
def test_hash_ids_outside_a_head_are_an_error_not_the_neighbours_rows(storage):
    """Row sizes[0] of head 0 is row 0 of head 1 in the flat table; -1 of head 1 is head 0's last
    row. Both used to be read silently."""
    sizes = [5, 7]
    mem = MultiHeadEmbedding(sizes, 3) if storage == "memory" else HostMultiHeadEmbedding(sizes, 3)
    ok = torch.tensor([[[4, 6], [0, 0]]])
    assert mem(ok).shape == (1, 2, 2, 3)
    with pytest.raises(ValueError, match=r"head 0 must be in \[0, 5\)"):
        mem(torch.tensor([[[5, 0]]]))
    with pytest.raises(ValueError, match=r"head 1 must be in \[0, 7\)"):
        mem(torch.tensor([[[0, -1]]]))
