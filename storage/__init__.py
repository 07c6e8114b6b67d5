"""SQLAlchemy models, the job/delivery state machine and the on-disk instance store."""
