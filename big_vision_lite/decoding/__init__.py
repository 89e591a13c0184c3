"""Running a model token by token: `engine` (prefill, decode steps, the one jitted decode loop), `samplers`,
`inspect` (attention captured during generation) with `attention_stats`, and `kv_eviction` (evicting slot caches).
"""
