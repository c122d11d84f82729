"""Everything about moving KV between engines: the NIXL connector's configuration for each role,
the transfer strategy of each connector (transfer.py), the Redis registry of engines' NIXL side
channels, the disaggregation policy, and transfer stats.

Only worker processes import vllm and nixl, and only from inside functions here.
"""
