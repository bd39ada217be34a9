"""Deprecated: the SDK moved to `sidecar.agent`; this re-export stays for one release."""

from sidecar.agent import *  # noqa: F403
from sidecar.agent import __all__ as __all__
