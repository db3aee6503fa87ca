"""Re-embedding existing stores with a local model (`woolocal migrate`); see `run` for the steps and guarantees."""

from woolocal_ingest.migrate.run import *  # noqa: F401,F403
from woolocal_ingest.migrate.run import __all__  # noqa: F401
