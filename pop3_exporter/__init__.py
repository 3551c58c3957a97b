"""Prometheus exporter that probes POP3 servers (plain, STLS and implicit TLS)."""

__version__ = "0.1.0"
