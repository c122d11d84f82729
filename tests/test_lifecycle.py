"""A worker's role follows from the queues it consumes."""

import pytest

from workers.lifecycle import role_for


def test_roles_from_queues():
    assert role_for(["decode"]) == "decode"
    assert role_for(["prefill"]) == "prefill"
    assert role_for(["router"]) == "router"


def test_one_engine_per_worker():
    with pytest.raises(ValueError, match="one engine"):
        role_for(["decode", "prefill"])


def test_unknown_queue_is_named():
    with pytest.raises(ValueError, match="decod"):
        role_for(["decod"])
