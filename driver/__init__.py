"""tidal.driver: the job - stages, the RL loop and its rollout pipeline, checkpoints, the run folder, the Ray runtime."""
