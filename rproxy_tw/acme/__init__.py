"""
Automatic HTTPS: certificates from any ACME (RFC 8555) CA, issued and renewed
while the proxy serves.  See docs/acme.md.
"""

from .challenges import ChallengeResponder
from .client import AcmeFailure, IssueResult
from .manager import AcmeManager, acme_names, challenge_types, check_acme

__all__ = ["AcmeFailure", "AcmeManager", "ChallengeResponder", "IssueResult", "acme_names", "challenge_types",
           "check_acme"]
