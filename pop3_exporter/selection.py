"""Which module probes a target: the one named, or the one a pop3:// or pop3s:// URL
implies; shared by /probe and the probe command."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from pop3_exporter.config import Config, Module, TLSMode
from pop3_exporter.metrics import InvalidRequestReason
from pop3_exporter.target import TargetSpec

# The module a bare pop3:// or pop3s:// target implies when no module is named.
SCHEME_MODULES: Mapping[str, str] = MappingProxyType({"pop3": "pop3", "pop3s": "pop3s"})


class ModuleChoiceError(ValueError):
    """The request names no usable module; `reason` is how /probe counts it."""

    def __init__(self, reason: InvalidRequestReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def known_modules(config: Config) -> str:
    return ", ".join(sorted(config.modules))


def choose_module(config: Config, spec: TargetSpec, module_name: str | None) -> Module:
    """The module a /probe request (or the probe command) names, or the one its URL
    scheme implies; raises ModuleChoiceError with the reason it is refused."""
    if module_name is None:
        if spec.scheme is None:
            raise ModuleChoiceError(
                InvalidRequestReason.BAD_MODULE,
                "parameter 'module' is required unless the target is a pop3:// or pop3s:// URL;"
                f" known modules: {known_modules(config)}",
            )
        module_name = SCHEME_MODULES[spec.scheme]
    module = config.modules.get(module_name)
    if module is None:
        raise ModuleChoiceError(
            InvalidRequestReason.UNKNOWN_MODULE,
            f"unknown module {module_name!r}; known modules: {known_modules(config)}",
        )
    if spec.scheme == "pop3s" and module.tls is not TLSMode.IMPLICIT:
        raise ModuleChoiceError(
            InvalidRequestReason.BAD_MODULE,
            f"pop3s:// target needs a module with tls: implicit, not {module.name}",
        )
    if spec.scheme == "pop3" and module.tls is TLSMode.IMPLICIT:
        raise ModuleChoiceError(
            InvalidRequestReason.BAD_MODULE,
            f"pop3:// target cannot use the implicit-TLS module {module.name}",
        )
    return module
