"""lthmpi: Lottery Ticket Hypothesis experiments with late resetting, spread over MPI ranks."""
import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ start-up chatter hides the one-line errors

__version__ = "0.1.0"
