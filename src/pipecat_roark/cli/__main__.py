"""``python -m pipecat_roark.cli``: the same as the ``pipecat-roark`` console script."""

from . import main

main()
