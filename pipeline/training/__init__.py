"""Training of the AIRT networks: training data (synthetic or clinical plans) and the two-stage training."""
