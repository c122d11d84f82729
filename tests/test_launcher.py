"""The launcher's pure parts: which engines it pins to which core."""

from launcher.__main__ import engine_cores


def test_several_engines_get_a_core_each_round_robin(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    envs = engine_cores(3, "auto")
    assert [e["VLLM_CPU_OMP_THREADS_BIND"] for e in envs] == ["0", "1", "0"]


def test_engines_that_move_kv_are_left_unpinned():
    # They unpin themselves (workers/engine.py); the launcher must not pin them first.
    assert engine_cores(2, "auto", moves_kv=True) == [{}, {}]


def test_one_engine_or_an_explicit_binding_is_left_to_vllm_and_the_config():
    assert engine_cores(1, "auto") == [{}]
    assert engine_cores(2, "0-1") == [{}, {}]
