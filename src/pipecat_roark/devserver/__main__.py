"""``python -m pipecat_roark.devserver``: the ``pipecat-roark dev-server`` command itself."""

from ..devserver_command import dev_server

dev_server(prog_name="python -m pipecat_roark.devserver")
