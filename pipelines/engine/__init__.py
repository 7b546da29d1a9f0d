"""Training machinery: the loop, checkpoints, run folders, devices, processes, samplers and solvers."""
