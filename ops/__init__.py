"""tunefleet's operator side: the command line, provisioning, studies, workers, backups."""

from ops.errors import TunefleetError

__version__ = "0.1.0"

__all__ = ["TunefleetError", "__version__"]
