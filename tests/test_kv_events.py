"""The KV event forwarder's sequence check: which engine batches it forwards, and what it counts
as lost (pure; the forwarder itself runs against real engines in test_kv_routing.py)."""

from workers.kv_events import Sequence, replay_endpoint_for


def test_batches_forward_once_in_order_and_gaps_count_as_lost():
    seq = Sequence()
    assert [seq.accept(s) for s in (0, 1, 1, 0, 2)] == [True, True, False, False, True]
    assert seq.num_lost == 0
    # 3 and 4 never came (the replay buffer no longer held them): 5 goes on, and they are counted.
    assert seq.accept(5) and seq.num_lost == 2
    assert not seq.accept(4) and seq.next == 6


def test_the_replay_socket_sits_beside_the_publisher():
    assert replay_endpoint_for("ipc:///tmp/llmq-kv-decode0-1.sock") == "ipc:///tmp/llmq-kv-decode0-1-replay.sock"
