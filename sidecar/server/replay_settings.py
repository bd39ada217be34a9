"""The recorded-response settings (docs/protocol.md §13, server/replays.py):

    replay_body_max_bytes: 32768   # a response body up to this is kept for the payment's
                                   # retries; a larger one is not (its retry is redelivered)
    replay_per_payer: 64           # responses one payer has kept at once, at most

Both top-level integers (env X402_REPLAY_BODY_MAX_BYTES, X402_REPLAY_PER_PAYER);
`replay_per_payer: 0` keeps none (every retry is a redelivery). Envoy buffers a response
for the sidecar up to its per-connection buffer (32 KiB at the edge, envoy/filters.py): a
larger body is never seen whole, so never kept. Checked here (ConfigError naming the key).
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.core.errors import ConfigError

DEFAULT_BODY_MAX_BYTES = 32 * 1024  # Envoy's edge buffer (envoy/filters.py BUFFER_LIMIT_BYTES)
DEFAULT_PER_PAYER = 64
MAX_BODY_BYTES = 1024 * 1024  # Envoy's default buffer: more is never seen whole
MAX_PER_PAYER = 10_000


@dataclass(frozen=True, slots=True)
class ReplaySettings:
    body_max_bytes: int = DEFAULT_BODY_MAX_BYTES
    per_payer: int = DEFAULT_PER_PAYER

    @property
    def enabled(self) -> bool:
        return self.per_payer > 0

    @classmethod
    def from_config(cls, body_max_bytes: int, per_payer: int) -> ReplaySettings:
        if not 0 <= body_max_bytes <= MAX_BODY_BYTES:
            raise ConfigError(f"config replay_body_max_bytes: 0 to {MAX_BODY_BYTES}")
        if not 0 <= per_payer <= MAX_PER_PAYER:
            raise ConfigError(f"config replay_per_payer: 0 to {MAX_PER_PAYER}")
        return cls(body_max_bytes, per_payer)
