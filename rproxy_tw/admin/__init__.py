"""
Operations: the admin listener (Prometheus metrics, a JSON API, a live
status page) and the supervisor that runs several workers.
"""

from .api import AdminSite, IAdminSource, LocalSource, admin_site
from .metrics import ProxyMetrics

__all__ = ["AdminSite", "IAdminSource", "LocalSource", "ProxyMetrics", "admin_site"]
