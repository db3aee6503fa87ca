"""`python -m woolocal_cli`: the `woolocal` command."""

import sys

from woolocal_cli.commands import main

sys.exit(main(prog_name="woolocal"))
