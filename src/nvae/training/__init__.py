"""Training: the objective, one step, the loop, its state, resume, validation and the run directory."""
