"""Training loop, checkpoints, run folders, devices and the stage-2 feature cache."""
