"""How a call reaches Roark from this process: the settings the observer was made with.

The observer owns one; the recorder starts the background drainer with it, and
``lifecycle`` keeps it (as a ``DeliveryTarget``) so the exit drain can ask it for its key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import lifecycle
from .background_drainer import ensure_background_drainer
from .delivery_process import ensure_delivery_process
from .exit_drain import deliver_before_exit

__all__ = ["CallDelivery"]


@dataclass(frozen=True, slots=True)
class CallDelivery:
    """How a call reaches Roark from this process: the background drainer while it runs.

    Or, with ``delivery_process``, this process's delivery child. And at most
    ``exit_drain_s`` of delivery when it ends during the host's shutdown.
    """

    directory: Path
    api_key: str | None
    base_url: str | None
    deliver: bool
    exit_drain_s: float
    keep_delivered_audio: bool
    delivery_process: bool = False

    def start(self) -> None:
        """Deliver while the call runs: the background drainer or the child (started once)."""
        if self.deliver and self.api_key:
            start = ensure_delivery_process if self.delivery_process else ensure_background_drainer
            start(
                self.directory,
                self.api_key,
                self.base_url,
                keep_delivered_audio=self.keep_delivered_audio,
            )

    async def after_end(self, call_id: str) -> None:
        """The call is committed: if the host is shutting down, deliver it now (bounded)."""
        if lifecycle.host_is_shutting_down() and self.deliver and self.api_key:
            await deliver_before_exit(
                self.directory,
                self.api_key,
                self.base_url,
                call_id,
                self.exit_drain_s,
                keep_delivered_audio=self.keep_delivered_audio,
            )
