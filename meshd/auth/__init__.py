"""API keys, tenants, authorization, quotas and forwarding verdicts (docs/auth.md).

Per request, at the entry node::

    key = keys.authenticate(parse_bearer(header), now=now)      # 401s
    tenant = keys.tenant(key.tenant)
    grant = authorize(key, tenant, model=..., requested=..., default=...)  # 403s
    admission = limiter.admit(key, tenant, quota.reservation(...), now)    # 429s
    ... serve (or forward with sign_verdict(node_key, Verdict(...), now)) ...
    limiter.settle(admission, usage.total_tokens, now)   # or release() if nothing ran

No asyncio and no clocks read here: time is passed in.
"""

from .errors import (
    AdmissionClosed,
    AmbiguousKey,
    InvalidKeySpec,
    KeyFileError,
    KeyNotFound,
    KeyStoreError,
    TenantNotFound,
)
from .keys import KEY_FILE_NAME, KeyFileReloaded, KeyStore, check_secret, hash_secret, parse_bearer
from .model import (
    DEFAULT_TENANT,
    DataClass,
    KeyRecord,
    Limits,
    TenantRecord,
    lowest,
    parse_expiry,
    parse_models,
    redact,
    split_secret,
)
from .policy import (
    DATA_CLASS_HEADER,
    Authorization,
    authorize,
    data_class_ceiling,
    model_allowed,
    parse_data_class,
    visible_models,
)
from .quota import (
    Admission,
    LimitStatus,
    QuotaConfig,
    QuotaLimiter,
    RateLimitStatus,
    format_duration,
)
from .verdict import (
    VERDICT_KIND,
    Verdict,
    VerdictReplayGuard,
    sign_verdict,
    verify_verdict,
)

__all__ = [
    "DATA_CLASS_HEADER",
    "DEFAULT_TENANT",
    "KEY_FILE_NAME",
    "VERDICT_KIND",
    "Admission",
    "AdmissionClosed",
    "AmbiguousKey",
    "Authorization",
    "DataClass",
    "InvalidKeySpec",
    "KeyFileError",
    "KeyFileReloaded",
    "KeyNotFound",
    "KeyRecord",
    "KeyStore",
    "KeyStoreError",
    "LimitStatus",
    "Limits",
    "QuotaConfig",
    "QuotaLimiter",
    "RateLimitStatus",
    "TenantNotFound",
    "TenantRecord",
    "Verdict",
    "VerdictReplayGuard",
    "authorize",
    "check_secret",
    "data_class_ceiling",
    "format_duration",
    "hash_secret",
    "lowest",
    "model_allowed",
    "parse_bearer",
    "parse_data_class",
    "parse_expiry",
    "parse_models",
    "redact",
    "sign_verdict",
    "split_secret",
    "verify_verdict",
    "visible_models",
]
