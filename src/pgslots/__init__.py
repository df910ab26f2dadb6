"""pgslots: global concurrency limits and rate limits that live in PostgreSQL."""

from __future__ import annotations

from ._core import Lease
from .client import Client, LeaseInfo, LimitInfo, configure, default_client
from .errors import (
    AcquireConcurrencySlotTimeoutError,
    ConcurrencySlotAcquisitionError,
    ConfigurationError,
    InvalidArgumentError,
    InvalidLimitNameError,
    InvalidLimitValueError,
    LeaseLostError,
    LeaseRenewalFailedError,
    LimitExistsError,
    LimitNotFoundError,
    MissingLimitsError,
    PgSlotsError,
    RateLimitWithoutDecayError,
    SchemaNotInstalledError,
    SlotsExceedLimitError,
)
from .migrate import LATEST_VERSION, migrate

__all__ = [
    "LATEST_VERSION",
    "Client",
    "Lease",
    "LeaseInfo",
    "LimitInfo",
    "configure",
    "default_client",
    "AcquireConcurrencySlotTimeoutError",
    "ConcurrencySlotAcquisitionError",
    "ConfigurationError",
    "InvalidArgumentError",
    "InvalidLimitNameError",
    "InvalidLimitValueError",
    "LeaseLostError",
    "LeaseRenewalFailedError",
    "LimitExistsError",
    "LimitNotFoundError",
    "MissingLimitsError",
    "PgSlotsError",
    "RateLimitWithoutDecayError",
    "SchemaNotInstalledError",
    "SlotsExceedLimitError",
    "migrate",
]
