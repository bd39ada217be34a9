"""An agent's EVM key: pays the x402 `exact` scheme (EIP-3009 on an EVM chain, e.g. USDC).

    key = EvmKey.load("agent.evm")          # a hex private key, mode 0600
    wallet = Wallet(identity, evm=key)      # or Wallet.from_env(): X402_EVM_KEY(_FILE)

The signature itself is the official `x402` package's (`ExactEvmScheme`, EIP-712 over an
EIP-3009 `transferWithAuthorization`): this module only loads the key and wraps the
payload in the x402 v2 `PAYMENT-SIGNATURE` envelope. `eth_account` and `x402` come with
the `evm` extra and are imported on first use, so `import sidecar.agent` loads neither.
"""

from __future__ import annotations

import os
import secrets
import string
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sidecar.agent.exact import EXACT, UPTO
from sidecar.core.errors import ConfigError, InvalidChallenge
from sidecar.core.identity import read_secret, write_secret

if TYPE_CHECKING:  # the `evm` extra
    from eth_account.signers.local import LocalAccount

ENV_EVM_KEY, ENV_EVM_KEY_FILE = "X402_EVM_KEY", "X402_EVM_KEY_FILE"
# secp256k1's group order: a private key is an integer in [1, N).
_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_EVM_EXTRA = "pip install 'x402-sidecar[evm]'"


def _missing(exc: ImportError) -> ConfigError:
    return ConfigError(f"paying with an EVM key needs {exc.name}: {_EVM_EXTRA}")


class EvmKey:
    """A secp256k1 private key that signs x402 `exact` payments. Never printed or logged."""

    __slots__ = ("_account", "_key")

    def __init__(self, private_key: bytes) -> None:
        value = int.from_bytes(private_key, "big")
        if len(private_key) != 32 or not 0 < value < _SECP256K1_N:
            raise ConfigError("not a secp256k1 private key")
        self._key = private_key
        self._account: LocalAccount | None = None

    def __repr__(self) -> str:  # the address, never the key
        try:
            return f"EvmKey(address={self.address!r})"
        except ConfigError:
            return "EvmKey(<evm extra not installed>)"

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def generate(cls) -> EvmKey:
        while True:
            raw = secrets.token_bytes(32)
            if 0 < int.from_bytes(raw, "big") < _SECP256K1_N:
                return cls(raw)

    @classmethod
    def from_text(cls, text: str, source: str = "EVM key") -> EvmKey:
        """64 hex digits, with or without 0x; the message never quotes the text."""
        key = text.strip().removeprefix("0x").removeprefix("0X")
        if len(key) != 64 or any(c not in string.hexdigits for c in key):
            raise ConfigError(f"{source}: not an EVM private key (expected 32 bytes of hex)")
        try:
            return cls(bytes.fromhex(key))
        except ConfigError:
            raise ConfigError(f"{source}: not a valid secp256k1 private key") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EvmKey:
        """A key file (`x402 keygen --evm`); refused if anyone but its owner may read it."""
        text = read_secret(path, "EVM key file").decode("utf-8", errors="replace")
        return cls.from_text(text, source=f"EVM key file {path}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EvmKey | None:
        """X402_EVM_KEY (hex text), else X402_EVM_KEY_FILE; None when neither is set."""
        env = os.environ if env is None else env
        if env.get(ENV_EVM_KEY):
            return cls.from_text(env[ENV_EVM_KEY], source=ENV_EVM_KEY)
        if env.get(ENV_EVM_KEY_FILE):
            return cls.load(env[ENV_EVM_KEY_FILE])
        return None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key as 0x-hex to a new file of mode 0600 (never overwrites)."""
        write_secret(path, self.hex + "\n")

    @property
    def hex(self) -> str:
        """The private key as 0x-hex: a secret (for `save` and the x402 signer only)."""
        return "0x" + self._key.hex()

    # -- the account -----------------------------------------------------------------------
    @property
    def account(self) -> LocalAccount:
        """The eth_account account (the `evm` extra), built once."""
        if self._account is None:
            try:
                from eth_account import Account
            except ImportError as exc:
                raise _missing(exc) from None
            self._account = Account.from_key(self._key)
        return self._account

    @property
    def address(self) -> str:
        """The checksummed address that pays (the `from` of each authorization)."""
        return str(self.account.address)

    def sign_exact(self, offer: Mapping[str, Any], resource: Mapping[str, Any] | None) -> str:
        """A `PAYMENT-SIGNATURE` value for one x402 v2 `exact` or `upto` offer (an
        `accepts[]` entry).

        The inner payload is the official client's `ExactEvmScheme` (EIP-3009 authorization,
        valid until now + the offer's maxTimeoutSeconds) or `UptoEvmScheme` (a Permit2
        witness transfer of at most the offer's amount: the payer's token needs an approval
        to Permit2); the envelope echoes the offer as `accepted` and the 402's `resource`,
        as the official clients send it."""
        try:
            from pydantic import ValidationError
            from x402.http.utils import encode_payment_signature_header
            from x402.mechanisms.evm import EthAccountSigner
            from x402.mechanisms.evm.exact import ExactEvmClientScheme
            from x402.schemas import PaymentPayload, PaymentRequirements, ResourceInfo
        except ImportError as exc:
            raise _missing(exc) from None
        try:
            requirements = PaymentRequirements.model_validate(dict(offer))
            info = ResourceInfo.model_validate(dict(resource)) if resource else None
        except ValidationError as exc:
            problem = exc.errors()[0]["msg"]
            raise InvalidChallenge(f"the 402's exact offer is malformed: {problem}") from None
        if requirements.scheme == UPTO:  # a maximum, settled for what the response used
            from x402.mechanisms.evm.upto import UptoEvmClientScheme

            scheme: Any = UptoEvmClientScheme(EthAccountSigner(self.account))
        elif requirements.scheme == EXACT:
            scheme = ExactEvmClientScheme(EthAccountSigner(self.account))
        else:
            raise InvalidChallenge(f"not an exact or upto offer: {requirements.scheme!r}")
        try:
            inner = scheme.create_payment_payload(requirements)
        except ValueError as exc:  # upto: no facilitatorAddress to bind
            raise InvalidChallenge(f"the 402's {requirements.scheme} offer: {exc}") from None
        payload = PaymentPayload(
            x402_version=2, payload=inner, accepted=requirements, resource=info
        )
        return encode_payment_signature_header(payload)
