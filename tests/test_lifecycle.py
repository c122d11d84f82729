"""A worker's role follows from the queues it consumes."""

import subprocess
import sys

import pytest

from conftest import ROOT
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


def test_the_start_up_heap_leaves_the_collectors_reach():
    # In a fresh interpreter, since the test runner's own heap is not this test's to freeze.
    probe = ("import gc; from workers.lifecycle import freeze_startup_heap; held = [[] for _ in range(1000)]; "
             "freeze_startup_heap(); seen = {id(o) for o in gc.get_objects()}; "
             "print(gc.get_freeze_count() >= 1000, gc.isenabled(), any(id(x) in seen for x in held))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True).stdout.split()
    # Frozen: the collector no longer sees the objects, and it still runs for new ones.
    assert out == ["True", "True", "False"]
