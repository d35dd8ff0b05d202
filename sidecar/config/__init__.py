"""Loading the sidecar's YAML configuration into frozen, validated dataclasses.

    config = load_config("sidecar.yaml")        # raises ConfigError listing every problem
    print(describe_config(config))

See docs/configuration.md for the file format.
"""

from sidecar.config.describe import describe_config, mask_url
from sidecar.config.issues import ConfigError, ConfigIssue
from sidecar.config.loader import embedded_config, load_config, parse_config
from sidecar.config.model import (
    AccessLogConfig,
    Address,
    BreakerConfig,
    CostConfig,
    FallbackConfig,
    IdempotencyConfig,
    IdentityConfig,
    IPNetwork,
    JwtConfig,
    LimitConfig,
    LoggingConfig,
    QuotaConfig,
    RetryConfig,
    RouteConfig,
    RouteMatch,
    RouteTracing,
    ServerConfig,
    SidecarConfig,
    SpanExportConfig,
    StateConfig,
    TracingConfig,
    UpstreamConfig,
)
from sidecar.config.units import format_duration, format_size, parse_duration, parse_size

__all__ = [
    "AccessLogConfig",
    "Address",
    "BreakerConfig",
    "ConfigError",
    "ConfigIssue",
    "CostConfig",
    "FallbackConfig",
    "IPNetwork",
    "IdempotencyConfig",
    "IdentityConfig",
    "JwtConfig",
    "LimitConfig",
    "LoggingConfig",
    "QuotaConfig",
    "RetryConfig",
    "RouteConfig",
    "RouteMatch",
    "RouteTracing",
    "ServerConfig",
    "SidecarConfig",
    "SpanExportConfig",
    "StateConfig",
    "TracingConfig",
    "UpstreamConfig",
    "describe_config",
    "embedded_config",
    "format_duration",
    "format_size",
    "load_config",
    "mask_url",
    "parse_config",
    "parse_duration",
    "parse_size",
]
