"""The configuration as probes use it: loaded, checked, with its TLS contexts built
once, and replaced whole on a reload."""

from __future__ import annotations

import functools
import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from pop3_exporter.config import (
    Config,
    ConfigProblem,
    InvalidConfigError,
    TLSConfig,
    TLSMode,
    default_config,
    in_file_order,
    load_config_partial,
)
from pop3_exporter.delivery import DeliveryKeyError, DeliveryRuntime, key_path, load_key
from pop3_exporter.errors import ConfigError
from pop3_exporter.logs import fields
from pop3_exporter.metrics import ExporterMetrics
from pop3_exporter.text import plural
from pop3_exporter.tlsinfo import build_ssl_context

logger = logging.getLogger("pop3_exporter")


@dataclass(frozen=True, slots=True)
class Runtime:
    """A loaded configuration with what is built from it once (TLS contexts, the keys
    and SMTP contexts of delivery modules)."""

    config: Config
    ssl_contexts: Mapping[str, ssl.SSLContext]
    deliveries: Mapping[str, DeliveryRuntime] = field(default_factory=lambda: MappingProxyType({}))


def build_runtime(
    config: Config, state_directory: Path | None = None, *, create_keys: bool = True
) -> Runtime:
    """Build the TLS contexts and delivery keys; raises InvalidConfigError naming every
    file that does not load, with the line and key path of the key that names it."""
    contexts, problems = _build_contexts(config)
    deliveries, delivery_problems = _build_deliveries(config, state_directory, create_keys)
    if problems or delivery_problems:
        raise InvalidConfigError(in_file_order((*problems, *delivery_problems)))
    return Runtime(
        config=config,
        ssl_contexts=MappingProxyType(contexts),
        deliveries=MappingProxyType(deliveries),
    )


def load_runtime(
    path: str | None, state_directory: Path | None = None, *, create_keys: bool = True
) -> Runtime:
    """Read, parse and build the configuration file (the built-in modules without one);
    raises InvalidConfigError with every problem found, in the file and in the files
    it names, in one go. `create_keys: False` (--config.check) makes no key file."""
    if path is None:
        return build_runtime(default_config())
    config, problems = load_config_partial(path)
    # The modules that parsed are built even when others did not: their certificate
    # problems are reported in the same run.
    try:
        runtime = build_runtime(config, state_directory, create_keys=create_keys)
    except InvalidConfigError as exc:
        raise InvalidConfigError(in_file_order((*problems, *exc.problems))) from None
    if problems:
        raise InvalidConfigError(problems)
    return runtime


def _build_deliveries(
    config: Config, state_directory: Path | None, create_keys: bool
) -> tuple[dict[str, DeliveryRuntime], list[ConfigProblem]]:
    deliveries: dict[str, DeliveryRuntime] = {}
    problems: list[ConfigProblem] = []
    policy = config.policy
    for name, module in config.modules.items():
        delivery = module.delivery
        if delivery is None:
            continue
        where = f"modules.{name}.delivery"
        smtp = delivery.smtp
        context = None
        if smtp.tls is not TLSMode.NONE:
            try:
                context = build_ssl_context(smtp.tls_config)
            except ConfigError as exc:
                section = f"{where}.smtp.tls_config"
                problems.append(_certificate_problem(config, section, smtp.tls_config, exc))
                continue
        if delivery.secret_file is None and state_directory is None:
            message = "needs secret_file, or the exporter's --state.directory"
            problems.append(_problem(config, where, message))
            continue
        path = key_path(delivery, state_directory or Path("."))
        try:
            key = load_key(path, create=create_keys) if create_keys or path.exists() else b""
        except DeliveryKeyError as exc:
            problems.append(_problem(config, f"{where}.secret_file", str(exc)))
            continue
        if not key and not _can_create(path):
            message = f"{path} does not exist and cannot be created"
            problems.append(_problem(config, f"{where}.secret_file", message))
            continue
        host, _, _ = smtp.endpoint()
        check = functools.partial(policy.check_address, host) if policy.uses_addresses else None
        deliveries[name] = DeliveryRuntime(
            key=key, smtp_ssl_context=context, smtp_address_check=check
        )
    return deliveries, problems


def _can_create(path: Path) -> bool:
    """Whether the exporter could make `path` (and its missing directories)."""
    for directory in path.parents:
        if directory.exists():
            return os.access(directory, os.W_OK | os.X_OK)
    return False


def _problem(config: Config, key: str, message: str) -> ConfigProblem:
    """A problem at `key`, on the line of the nearest key of its path that has one."""
    parts = key.split(".")
    line = next(
        (
            config.lines[p]
            for p in (".".join(parts[:n]) for n in range(len(parts), 0, -1))
            if p in config.lines
        ),
        None,
    )
    return ConfigProblem(config.source, line, key, message)


def _build_contexts(config: Config) -> tuple[dict[str, ssl.SSLContext], list[ConfigProblem]]:
    contexts: dict[str, ssl.SSLContext] = {}
    problems: list[ConfigProblem] = []
    # One context per distinct tls_config, shared by the modules that have it.
    built: dict[TLSConfig, ssl.SSLContext | ConfigError] = {}
    for name, module in config.modules.items():
        if not module.uses_tls:
            continue
        tls_config = module.tls_config
        if tls_config not in built:
            try:
                built[tls_config] = build_ssl_context(tls_config)
            except ConfigError as exc:
                built[tls_config] = exc
        context = built[tls_config]
        if isinstance(context, ConfigError):
            problems.append(
                _certificate_problem(config, f"modules.{name}.tls_config", tls_config, context)
            )
        else:
            contexts[name] = context
    return contexts, problems


def _certificate_problem(
    config: Config, section: str, tls_config: TLSConfig, exc: ConfigError
) -> ConfigProblem:
    """The problem of a tls_config (key path `section`) whose files do not load, at the
    key that names the file that fails."""
    key, message = diagnose_tls_files(tls_config)
    return _problem(config, f"{section}.{key}" if key else section, message or str(exc))


def diagnose_tls_files(tls_config: TLSConfig) -> tuple[str, str]:
    """Which key of ``tls_config`` names a file that does not load, and why:
    ("ca_file", "cannot load certificates: ..."), or ("", "") if each file loads.

    OpenSSL's errors do not say which file they are about, so each one is tried alone,
    each read first so that a missing file is reported with its path.
    """
    ca_file, cert_file, key_file = tls_config.ca_file, tls_config.cert_file, tls_config.key_file
    if ca_file is not None:
        problem = _load_problem(ca_file, lambda c: c.load_verify_locations(cafile=ca_file))
        if problem:
            return "ca_file", f"cannot load certificates: {problem}"
    if cert_file is not None and key_file is not None:
        problem = _load_problem(cert_file, lambda c: c.load_verify_locations(cafile=cert_file))
        if problem:
            return "cert_file", f"cannot load the client certificate: {problem}"
        problem = _load_problem(key_file, lambda c: c.load_cert_chain(cert_file, key_file))
        if problem:
            return "key_file", f"cannot load the key, or it does not match cert_file: {problem}"
    return "", ""


def _load_problem(path: str, load: Callable[[ssl.SSLContext], None]) -> str:
    try:
        with open(path, "rb"):
            pass
        load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    except ssl.SSLError as exc:
        return f"{exc}: {path!r}"
    except OSError as exc:
        # open()'s error names the file: "[Errno 2] No such file or directory: '/x.pem'".
        return str(exc)
    return ""


def log_warnings(config: Config) -> None:
    for warning in config.warnings:
        logger.warning(
            "configuration warning",
            extra=fields(
                file=warning.file, line=warning.line, key=warning.key, err=warning.message
            ),
        )


def log_problems(problems: tuple[ConfigProblem, ...]) -> None:
    """One error line per problem, its parts as fields."""
    for problem in problems:
        logger.error(
            "invalid configuration",
            extra=fields(
                file=problem.file, line=problem.line, key=problem.key, err=problem.message
            ),
        )


class ConfigHolder:
    """The current runtime; replaced whole on a successful reload, kept on a failed one."""

    def __init__(
        self, path: str | None, metrics: ExporterMetrics, state_directory: Path | None = None
    ) -> None:
        self.path = path
        self.metrics = metrics
        self.state_directory = state_directory
        self.runtime = load_runtime(path, state_directory)
        log_warnings(self.runtime.config)
        self._mark(success=True)

    def _mark(self, *, success: bool) -> None:
        self.metrics.reload_success.set(1 if success else 0)
        if success:
            self.metrics.reload_timestamp.set(time.time())

    def reload(self) -> str | None:
        """Reload from disk; returns None on success, else every reason it was refused
        (one per line)."""
        try:
            runtime = load_runtime(self.path, self.state_directory)
        except InvalidConfigError as exc:
            self._mark(success=False)
            log_problems(exc.problems)
            logger.error(
                "config reload failed, keeping the old config",
                extra=fields(file=self.path, errors=len(exc.problems)),
            )
            return f"{plural(len(exc.problems), 'error')}:\n{exc}"
        self.runtime = runtime
        log_warnings(runtime.config)
        self._mark(success=True)
        logger.info(
            "config reloaded",
            extra=fields(file=runtime.config.source, modules=module_names(runtime.config)),
        )
        return None


def module_names(config: Config) -> str:
    """The module names, sorted and comma-separated (one field value in logs)."""
    return ",".join(sorted(config.modules))
