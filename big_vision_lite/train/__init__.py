"""Training: one loop (loop.py) for every task (tasks/), with its checkpoints, config files, metrics, optimizer,
sharding rules, and the runs a task requires (runs.py)."""
