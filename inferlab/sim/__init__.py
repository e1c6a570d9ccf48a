"""Scheduling simulator: the engine's own Scheduler and BlockManager on a virtual clock."""
