"""pgslots: global concurrency limits and rate limits that live in PostgreSQL."""

from __future__ import annotations

from .client import Client, configure, default_client
from .errors import (
    AcquireConcurrencySlotTimeoutError,
    ConcurrencySlotAcquisitionError,
    ConfigurationError,
    DatabaseError,
    DatabaseUnavailableError,
    InvalidArgumentError,
    InvalidLimitNameError,
    InvalidLimitValueError,
    LeaseLostError,
    LeaseRenewalFailedError,
    LimitExistsError,
    LimitNotFoundError,
    LockWaitTimeoutError,
    MissingLimitsError,
    PgSlotsError,
    RateLimitWithoutDecayError,
    ReservationError,
    SchemaNotInstalledError,
    SlotsExceedLimitError,
    TemplateError,
    WindowLimitError,
)
from .migrate import LATEST_VERSION, migrate, migration_plan
from .types import Lease, LeaseInfo, LimitInfo, MigrationPlan

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
    "DatabaseError",
    "DatabaseUnavailableError",
    "InvalidArgumentError",
    "InvalidLimitNameError",
    "InvalidLimitValueError",
    "LeaseLostError",
    "LeaseRenewalFailedError",
    "LimitExistsError",
    "LimitNotFoundError",
    "LockWaitTimeoutError",
    "MissingLimitsError",
    "PgSlotsError",
    "RateLimitWithoutDecayError",
    "ReservationError",
    "SchemaNotInstalledError",
    "SlotsExceedLimitError",
    "TemplateError",
    "WindowLimitError",
    "migrate",
    "MigrationPlan",
    "migration_plan",
]
