"""Retry back-off and the per-model circuit breaker."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from pluggably.core.errors import Unavailable
from pluggably.core.types import CircuitState


def backoff_s(
    attempt: int, initial_s: float, max_s: float, retry_after_s: float | None = None
) -> float:
    """The pause before retry number `attempt` (1 = the first retry): exponential with full
    jitter (so clients that failed together do not retry together), and never shorter than the
    provider's own retry hint."""
    ceiling = min(max_s, initial_s * 2 ** (attempt - 1))
    delay = random.uniform(ceiling / 2, ceiling)
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    return delay


class CircuitBreaker:
    """Opens after `threshold` consecutive failures; refuses requests for `open_s`; then lets one
    probe through (half-open): its success closes the circuit, its failure opens it again.

    Only failures that say something about the model's health count (server errors, timeouts,
    unusable responses), not requests the provider refused or rate limits.
    """

    def __init__(
        self,
        subject: str,
        threshold: int,
        open_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.subject = subject
        self.threshold = threshold
        self.open_s = open_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> CircuitState:
        if self._opened_at is None:
            return CircuitState.CLOSED
        if self._clock() - self._opened_at >= self.open_s:
            return CircuitState.HALF_OPEN
        return CircuitState.OPEN

    def acquire(self) -> bool:
        """Call before an attempt; raises Unavailable while the circuit refuses requests.
        Returns whether this attempt is the half-open probe: hand that to `failure`/`release`,
        so that a request admitted before the circuit opened, ending while the probe is out,
        does not free the probe's slot (which would let a second probe through)."""
        if self.threshold <= 0 or self._opened_at is None:
            return False
        remaining = self.open_s - (self._clock() - self._opened_at)
        if remaining > 0 or self._probing:
            raise Unavailable(
                f"{self.subject} failed {self.threshold} times in a row; the gateway stops sending "
                f"it requests for a while (circuit breaker open)",
                reason="PROVIDER_CIRCUIT_OPEN",
                retry_after_s=round(max(remaining, 1.0), 1),
                metadata={"model": self.subject},
            )
        self._probing = True
        return True

    def success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def failure(self, probe: bool | None = None) -> None:
        """`probe`: what `acquire` returned for the attempt (None: unknown, taken as the probe)."""
        self._failures += 1
        if probe is not False:
            self._probing = False
        if self.threshold > 0 and (self._failures >= self.threshold or self._opened_at is not None):
            self._opened_at = self._clock()

    def release(self, probe: bool | None = None) -> None:
        """An attempt ended without a verdict on the model's health (the client went away, or
        the provider refused the request itself): if it was the probe, the next may go."""
        if probe is not False:
            self._probing = False
