"""Benchmark harness for any OpenAI-compatible endpoint: `python -m bench run --help`.

Modules: `workloads` (seeded request sets, pure), `client` (the streaming client and the
open/closed-loop load generator), `runner` (targets x load points under one deadline), `stats`
(percentiles and summaries, pure), `report` (results.json, report.md, PNG plots).

Scenarios that start their own servers (`deploy`) and share `scenario` and `cache_stats`:
`kv_routing`, `vs_vllm`, `profiling`, `router_speed`, `aiperf_check`, `stages` (`python -m bench --help`).
"""
