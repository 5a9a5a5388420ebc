"""Providers: the registry of implementations, found by scanning this package.

Adding a provider takes one new module here with a :class:`Provider` subclass decorated with
:func:`register`, and a ``[providers.<name>]`` table in the settings (``type`` names the implementation and
defaults to the table's name).  Neither the API nor the dispatcher changes.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, TypeVar

from common.providers.base import (DeliveryReport, PermanentProviderError, Provider, ProviderConfigError,
                                   ProviderContext, ProviderError, ProviderTimeout, SendReceipt, Sms)
from common.settings import Settings

__all__ = ["DeliveryReport", "PermanentProviderError", "Provider", "ProviderConfigError", "ProviderContext",
           "ProviderError", "ProviderTimeout", "SendReceipt", "Sms", "build_providers", "implementations",
           "register"]

P = TypeVar("P", bound=type[Provider])
_IMPLEMENTATIONS: dict[str, type[Provider]] = {}


def register(type_name: str) -> Callable[[P], P]:
    """Class decorator: make a provider implementation available under ``type_name``."""
    def decorate(cls: P) -> P:
        existing = _IMPLEMENTATIONS.get(type_name)
        if existing is not None and existing is not cls:
            raise ProviderConfigError(f"two provider implementations are called {type_name!r}")
        cls.type_name = type_name
        _IMPLEMENTATIONS[type_name] = cls
        return cls
    return decorate


def implementations() -> dict[str, type[Provider]]:
    """Every provider implementation in this package, by type name (imports the modules once)."""
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")
    return dict(_IMPLEMENTATIONS)


def build_providers(settings: Settings) -> dict[str, Provider]:
    """One instance per configured, enabled provider, by name, in configuration order."""
    known = implementations()
    context = ProviderContext(sent_sms_dir=settings.sent_sms_dir)
    built: dict[str, Provider] = {}
    for provider_settings in settings.providers:
        cls = known.get(provider_settings.type)
        if cls is None:
            raise ProviderConfigError(f"providers.{provider_settings.name}: no implementation called "
                                      f"{provider_settings.type!r} (known: {', '.join(sorted(known))})")
        if provider_settings.enabled:
            built[provider_settings.name] = cls(provider_settings, context)
    return built
