"""pipecat-roark."""
