"""lthmpi: Lottery Ticket Hypothesis experiments with late resetting, spread over MPI ranks."""
__version__ = "0.1.0"
