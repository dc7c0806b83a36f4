"""
One certificate issuance, run in a thread of the reactor's pool.

The C{acme} package's client (the one certbot uses) speaks RFC 8555 with
blocking C{requests} calls; run in a thread, it never blocks the reactor, and
what it needs from the reactor (putting a challenge answer in place, taking
it away) goes through C{blockingCallFromThread}, so the answer is served
before the CA is told to look.  Every network call has a timeout, and the
whole issuance a deadline.
"""

from __future__ import annotations

import datetime
import time
from typing import Any, Callable

import josepy as jose
from acme import client as acme_client
from acme import challenges as acme_challenges
from acme import crypto_util, errors, messages
from attrs import frozen

from ..config import AcmeConfig
from .challenges import ChallengeResponder, TLSALPNChallenge
from .schedule import RENEW_AT, retry_after_seconds
from .storage import AcmeStorage, StoredCertificate, key_pem, new_key

__all__ = ["AcmeFailure", "IssueResult", "LockBusy", "issue_blocking"]

NETWORK_TIMEOUT = 30
"""Seconds one HTTP exchange with the CA may take."""

ISSUE_DEADLINE = 120.0
"""Seconds the validation and finalization of one order may take in all."""

USER_AGENT = "rproxy-acme"


@frozen
class IssueResult:
    stored: StoredCertificate
    issued: bool
    """C{False}: another process had issued it (the lock's holder), and this one picked it up."""
    suggested_renewal: float | None = None
    """The CA's renewal information (RFC 9773), when it offers it."""
    challenge: str | None = None
    ari_next_poll: float | None = None
    """When to ask the CA's renewal information again (C{None}: the CA offers none)."""


class AcmeFailure(Exception):
    """The CA refused, or could not be reached: one line to log, and the CA's C{Retry-After} if it sent one."""

    def __init__(self, message: str, retry_after: float | None = None, rate_limited: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.rate_limited = rate_limited


class LockBusy(Exception):
    """Another process (or manager) sharing the storage folder is issuing for this name."""


def _register_tls_alpn01() -> None:
    """
    The C{acme} package dropped its TLS-ALPN-01 classes (certbot no longer
    uses them); the messages are RFC 8737's and tiny, so they are declared
    here: the challenge carries a token, the response is an empty object.
    """
    if "tls-alpn-01" in acme_challenges.Challenge.TYPES:
        return

    @acme_challenges.ChallengeResponse.register
    class TLSALPN01Response(acme_challenges.KeyAuthorizationChallengeResponse):
        typ = "tls-alpn-01"

    @acme_challenges.Challenge.register
    class TLSALPN01(acme_challenges.KeyAuthorizationChallenge):
        response_cls = TLSALPN01Response
        typ = response_cls.typ

        def validation(self, account_key: jose.JWK, **kwargs: Any) -> Any:
            return None  # the certificate is made by rproxy_tw.acme.challenges


_register_tls_alpn01()


class _Network(acme_client.ClientNetwork):
    """The C{acme} package's network, keeping the last error's C{Retry-After} (its errors drop the headers)."""

    retry_after: str | None = None

    def _check_response(self, response: Any, content_type: str | None = None) -> Any:  # type: ignore[override]
        if not response.ok:
            self.retry_after = response.headers.get("Retry-After")
        return super()._check_response(response, content_type=content_type)


def issue_blocking(config: AcmeConfig, storage: AcmeStorage, responder: ChallengeResponder, name: str,
                   challenges: tuple[str, ...], current_serial: int | None, force: bool,
                   in_reactor: Callable[..., Any]) -> IssueResult:
    """
    Get a certificate for C{name} into the storage folder (blocking: call in a thread).

    @param challenges: the challenge types this proxy can answer for C{name},
        in the order to prefer them.
    @param current_serial: the serial of the certificate served now (None: a
        temporary one); a stored one with another serial that is not due for
        renewal was issued by another process and is taken as it is.
    @param force: issue even if the stored certificate is not due.
    @param in_reactor: runs a function in the reactor thread and returns its
        result (C{blockingCallFromThread} bound to the reactor).
    @raise LockBusy: another process holds the name's lock.
    @raise AcmeFailure: the CA refused or could not be reached.
    """
    storage.prepare()
    fd = storage.try_lock(name)
    if fd is None:
        raise LockBusy(name)
    try:
        stored = storage.read(storage.certificate_path(name), time.time())
        if stored is not None and not force and stored.serial != current_serial:
            due = stored.not_before + (stored.not_after - stored.not_before) * RENEW_AT
            if due > time.time():
                return IssueResult(stored, issued=False)
        return _issue(config, storage, responder, name, challenges, in_reactor)
    finally:
        storage.unlock(fd)


def _issue(config: AcmeConfig, storage: AcmeStorage, responder: ChallengeResponder, name: str,
           challenges: tuple[str, ...], in_reactor: Callable[..., Any]) -> IssueResult:
    account_key = jose.JWKEC(key=storage.account_key())
    net = _Network(key=account_key, alg=jose.ES256, verify_ssl=config.ca or True, user_agent=USER_AGENT,
                   timeout=NETWORK_TIMEOUT)
    installed: list[Callable[[], None]] = []
    try:
        directory = acme_client.ClientV2.get_directory(config.directory, net)
        client = acme_client.ClientV2(directory, net)
        registration = messages.NewRegistration.from_data(email=config.email or None, terms_of_service_agreed=True)
        try:
            client.new_account(registration)
        except errors.ConflictError as e:  # the key has an account already: use it
            net.account = messages.RegistrationResource(uri=e.location, body=messages.Registration())
        certificate_key = new_key()
        csr = crypto_util.make_csr(key_pem(certificate_key), [name])
        order = client.new_order(csr)
        used = None
        for authorization in order.authorizations:
            if authorization.body.status == messages.STATUS_VALID:
                continue
            offered = {c.chall.typ: c for c in authorization.body.challenges
                       if isinstance(c.chall, acme_challenges.KeyAuthorizationChallenge)}
            kind = next((t for t in challenges if t in offered), None)
            if kind is None:
                raise AcmeFailure(f"the CA offers {sorted(offered)} for {name}, and this proxy can answer "
                                  f"only {list(challenges)}")
            body = offered[kind]
            key_authorization = body.chall.key_authorization(account_key).encode("ascii")
            if kind == "http-01":
                token = body.chall.encode("token").encode("ascii")
                in_reactor(responder.http01.__setitem__, token, key_authorization)
                installed.append(lambda token=token: responder.http01.pop(token, None))
            else:
                challenge = TLSALPNChallenge(name, key_authorization, time.time(), storage.folder)
                in_reactor(responder.tls_alpn01.__setitem__, name, challenge)
                installed.append(lambda: responder.tls_alpn01.pop(name, None))
            client.answer_challenge(body, body.response(account_key))
            used = kind
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=ISSUE_DEADLINE)
        order = client.poll_and_finalize(order, deadline)
        storage.write(storage.certificate_path(name), order.fullchain_pem.encode("ascii") + key_pem(certificate_key))
        stored = storage.read(storage.certificate_path(name), time.time())
        if stored is None:
            raise AcmeFailure(f"the CA's certificate for {name} does not load (or has expired already)")
        suggested = next_poll = None
        if _offers(directory, "renewalInfo"):
            try:
                suggested, next_poll = _renewal_info(client, stored.pem)
            except Exception:  # noqa: BLE001 - advisory: the certificate is issued, the 2/3 rule then
                suggested = next_poll = None
        return IssueResult(stored, issued=True, suggested_renewal=suggested, challenge=used, ari_next_poll=next_poll)
    except AcmeFailure:
        raise
    except messages.Error as e:
        rate_limited = e.code == "rateLimited" or (e.typ or "").endswith(":rateLimited")
        raise AcmeFailure(f"the CA refused: {e.typ}: {e.detail}",
                          retry_after_seconds(net.retry_after, time.time()), rate_limited) from None
    except errors.ValidationError as e:
        problems = "; ".join(
            f"{a.body.identifier.value}: " + "; ".join(
                f"{c.chall.typ} {c.error.typ if c.error else ''} {c.error.detail if c.error else ''}".strip()
                for c in a.body.challenges if c.error is not None)
            for a in e.failed_authzrs)
        raise AcmeFailure(f"validation failed: {problems}") from None
    except errors.TimeoutError:
        raise AcmeFailure(f"the CA did not validate and issue within {ISSUE_DEADLINE:.0f} s") from None
    except errors.Error as e:
        raise AcmeFailure(f"ACME error: {e}") from None
    except OSError as e:  # requests' connection errors are OSErrors
        raise AcmeFailure(f"cannot reach the CA: {type(e).__name__}: {e}") from None
    except ValueError as e:
        raise AcmeFailure(f"unusable answer from the CA: {e}") from None
    finally:
        for remove in installed:
            try:
                in_reactor(remove)
            except Exception:  # noqa: BLE001 - the reactor stopped: nothing serves them any more
                pass


def _offers(directory: messages.Directory, field: str) -> bool:
    try:
        directory[field]
    except KeyError:
        return False
    return True


def _renewal_info(client: acme_client.ClientV2, pem: bytes) -> tuple[float | None, float]:
    """The CA's suggested renewal moment (RFC 9773) and when to ask again, as epoch seconds."""
    when, again = client.renewal_time(pem)
    return (when.timestamp() if when is not None else None), again.timestamp()


def renewal_info_blocking(config: AcmeConfig, pem: bytes) -> tuple[float | None, float] | None:
    """
    Ask the CA's renewal information for a certificate (blocking: call in a
    thread): the suggested moment and when to ask again, or C{None} when the
    directory offers none.  No account is needed.

    @raise AcmeFailure: the CA could not be reached or answered badly.
    """
    net = _Network(verify_ssl=config.ca or True, user_agent=USER_AGENT, timeout=NETWORK_TIMEOUT)
    try:
        directory = acme_client.ClientV2.get_directory(config.directory, net)
        if not _offers(directory, "renewalInfo"):
            return None
        return _renewal_info(acme_client.ClientV2(directory, net), pem)
    except Exception as e:  # noqa: BLE001 - advisory: any failure is "ask again later"
        raise AcmeFailure(f"renewal information: {type(e).__name__}: {e}") from None
