"""
The certificates of every C{acme} name: issued on start when none is stored,
renewed while serving, and put into the TLS listeners' SNI maps at once.

One state per name.  A name starts on its stored certificate, or on a
temporary self-signed one (logged) until the CA issues; listeners never wait.
An attempt runs L{rproxy_tw.acme.client.issue_blocking} in the reactor's
thread pool; its outcome schedules the next one on the injected clock:

  - issued, or picked up from the storage folder: renew at two thirds of the
    lifetime less a jitter, or at the CA's renewal information (RFC 9773);
  - failed: retry with exponential back-off, never sooner than the CA's
    C{Retry-After}; the certificate serving keeps serving;
  - another process holds the name's lock: look again after the minimum
    back-off and take what it stored.

Each outcome is one log line with the name and the next attempt's time.
"""

from __future__ import annotations

import datetime
import os
import queue
import random
import weakref
from typing import Any, Callable, Mapping

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredSemaphore, fail
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config import AcmeConfig, CertificateConfig, ProxyConfig
from ..events import CertificateChanged, CertificateFailed
from ..logs import observer as log_observer
from .challenges import ChallengeResponder
from .client import AcmeFailure, IssueResult, LockBusy
from .schedule import MAX_BACKOFF, MIN_BACKOFF, backoff, renewal_time
from .storage import AcmeStorage, StoredCertificate, self_signed

__all__ = ["AcmeManager", "acme_names", "challenge_types"]

TEMPORARY_DAYS = 7
"""Lifetime of the self-signed certificate served until the CA issues (made anew when it lapses)."""

ISSUING_AT_ONCE = 2
"""
Issuances running at once: each holds a thread of the reactor's pool (which
Twisted's default name resolver shares) for seconds, so many names never
take all of it.
"""

REACTOR_CALL_TIMEOUT = 10.0
"""Seconds the issuing thread waits for the reactor to put a challenge answer in place."""


def acme_names(config: ProxyConfig) -> dict[str, tuple[str, ...]]:
    """
    The names to get certificates for, by TLS profile: the profile's C{acme}
    list, or for C{acme = true} every host name the routes name (wildcards
    cannot be had over http-01 or tls-alpn-01, so they are left out).
    """
    routed = tuple(dict.fromkeys(
        r.host.lower().rstrip(".") for r in config.routes if r.host and "*" not in r.host))
    out: dict[str, tuple[str, ...]] = {}
    for name, profile in config.tls.items():
        if profile.acme is True:
            out[name] = routed
        elif profile.acme:
            out[name] = tuple(profile.acme)
    return out


def challenge_types(config: ProxyConfig, profile: str) -> tuple[str, ...]:
    """
    The challenge types, in C{[acme] challenges} order, this config can answer
    for a profile's names: http-01 when a plain HTTP listener exists (the CA
    comes to port 80), tls-alpn-01 when an HTTP listener serves the profile
    over the C{ssl} transport (no client certificates).
    """
    acme = config.deferred_sections.get("acme") or AcmeConfig()
    usable = set()
    if any(lc.protocol == "http" and lc.tls is None for lc in config.listen):
        usable.add("http-01")
    tls_profile = config.tls.get(profile)
    if tls_profile is not None and tls_profile.client_ca is None and not os.environ.get("RPROXY_TLS_PYOPENSSL") \
            and any(lc.protocol == "http" and lc.tls == profile for lc in config.listen):
        usable.add("tls-alpn-01")
    return tuple(t for t in acme.challenges if t in usable)


def _when(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _NameState:
    """What the manager knows of one name."""

    def __init__(self, name: str, challenges: tuple[str, ...]) -> None:
        self.name = name
        self.challenges = challenges
        self.stored: StoredCertificate | None = None
        """The CA's certificate serving now, or C{None} while the temporary one does."""
        self.temporary: str | None = None
        self.failures = 0
        self.next_attempt: float | None = None
        self.call: Any = None
        self.attempt: Deferred[IssueResult] | None = None
        self.waiters: list[Deferred[IssueResult]] = []
        self.ari_poll: Any = None
        """The next look at the CA's renewal information (RFC 9773), when it offers it."""


Issuer = Callable[[str, tuple[str, ...], "int | None", bool], "Deferred[IssueResult]"]

RenewalInfo = Callable[[bytes], "Deferred[tuple[float | None, float] | None]"]

ARI_RETRY = 6 * 3600.0
"""Seconds before asking the renewal information again after a failed ask (RFC 9773's default)."""


class AcmeManager(Service):
    """
    Certificates from the C{[acme]} CA for the names of the C{acme} TLS
    profiles.  The TLS contexts of those profiles L{attach} themselves and
    load L{certificates_for}; the HTTP listeners answer HTTP-01 from
    L{responder}, the TLS transport answers TLS-ALPN-01 from it.

    @ivar states: each name's state, by name.
    """

    _log = Logger(observer=log_observer)

    def __init__(self, reactor: Any, config: ProxyConfig, issue: Issuer | None = None,
                 rng: random.Random | None = None, min_backoff: float = MIN_BACKOFF,
                 max_backoff: float = MAX_BACKOFF, events: Any = None,
                 renewal_info: RenewalInfo | None = None) -> None:
        """
        @param reactor: C{IReactorTime} for the schedule; C{IReactorThreads}
            and C{IReactorFromThreads} for the default issuer.
        @param issue: runs one attempt (name, challenge types, serial served
            now, force) and fires with an L{IssueResult}, or fails with
            L{AcmeFailure} or L{LockBusy}; by default the C{acme} client in a thread.
        @param renewal_info: asks the CA's renewal information for a
            certificate (PEM); by default the C{acme} client in a thread.
        @param events: the L{rproxy_tw.events.EventBus} told of each
            L{CertificateChanged} and L{CertificateFailed}.
        @raise OSError: the storage folder cannot be made or written.
        """
        self.reactor = reactor
        self.events = events
        self.rng = rng or random.Random()
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.responder = ChallengeResponder()
        self.states: dict[str, _NameState] = {}
        self.profiles: dict[str, tuple[str, ...]] = {}
        self._contexts: dict[str, weakref.WeakSet[Any]] = {}
        self._issue = issue or self._issue_in_thread
        self._renewal_info = renewal_info or self._renewal_info_in_thread
        self._threads = DeferredSemaphore(ISSUING_AT_ONCE)
        self.configure(config)

    # -- configuration -----------------------------------------------------------------------

    def configure(self, config: ProxyConfig) -> None:
        """
        Take a configuration (at start, and on reload): names added get their
        stored or a temporary certificate (and an attempt when running);
        names gone stop being renewed.
        """
        self.config = config
        self.acme: AcmeConfig = config.deferred_sections.get("acme") or AcmeConfig()
        self.storage = AcmeStorage(self.acme.storage)
        self.storage.prepare()
        self.profiles = acme_names(config)
        wanted: dict[str, tuple[str, ...]] = {}
        for profile, names in self.profiles.items():
            kinds = challenge_types(config, profile)
            for name in names:
                wanted[name] = tuple(dict.fromkeys(wanted.get(name, ()) + kinds))
        for name in list(self.states):
            if name not in wanted:
                state = self.states.pop(name)
                for call in (state.call, state.ari_poll):
                    if call is not None and call.active():
                        call.cancel()
        now = self.reactor.seconds()
        for name, kinds in wanted.items():
            state = self.states.get(name)
            if state is not None:
                state.challenges = kinds
                continue
            state = self.states[name] = _NameState(name, kinds)
            state.stored = self.storage.read(self.storage.certificate_path(name), now)
            if state.stored is None:
                self._use_temporary(state, now)
            if not kinds:
                self._log.error("acme: no listener can answer a challenge for {name} (http-01 needs a plain http "
                                "listener, tls-alpn-01 an https one); it keeps its temporary certificate", name=name)
            if self.running:
                self._schedule(state, self._first_attempt(state))

    def _use_temporary(self, state: _NameState, now: float) -> None:
        self._fresh_temporary(state, now)
        if self.acme.unissued == "refuse":
            self._log.warn("acme: refusing TLS handshakes for {name} until the CA issues its certificate",
                           name=state.name)
        else:
            self._log.warn("acme: serving a temporary self-signed certificate for {name} until the CA issues one",
                           name=state.name)

    def _fresh_temporary(self, state: _NameState, now: float) -> bool:
        """Make the name's temporary certificate anew when it has less than a day left.  @return: whether it did."""
        path = state.temporary = self.storage.temporary_path(state.name)
        if self.storage.read(path, now + 86400) is not None:
            return False
        self.storage.write(path, self_signed(state.name, now, days=TEMPORARY_DAYS))
        return True

    def certificates_for(self, profile: str) -> tuple[CertificateConfig, ...]:
        """The files a profile's TLS contexts load for its ACME names: issued ones, else the temporary ones."""
        out = []
        for name in self.profiles.get(profile, ()):
            state = self.states.get(name)
            if state is None:
                continue
            path = state.stored.path if state.stored is not None else state.temporary
            if path is not None:
                out.append(CertificateConfig(cert=path, key=path))
        return tuple(out)

    def refused_for(self, profile: str) -> frozenset[str]:
        """
        The files of L{certificates_for} that stand in for a name not issued
        yet, when C{[acme] unissued = "refuse"}: their handshakes are refused
        (the files are still loaded, so the profile always has a context).
        """
        if self.acme.unissued != "refuse":
            return frozenset()
        return frozenset(state.temporary for name in self.profiles.get(profile, ())
                         if (state := self.states.get(name)) is not None
                         and state.stored is None and state.temporary is not None)

    def attach(self, profile: str, contexts: Any) -> None:
        """TLS contexts serving C{profile}: they are reloaded when one of its certificates changes."""
        self._contexts.setdefault(profile, weakref.WeakSet()).add(contexts)

    # -- the schedule ------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        for state in self.states.values():
            self._schedule(state, self._first_attempt(state))

    def stopService(self) -> Any:
        for state in self.states.values():
            for call in (state.call, state.ari_poll):
                if call is not None and call.active():
                    call.cancel()
            state.call = state.ari_poll = None
        return super().stopService()

    def _first_attempt(self, state: _NameState) -> float:
        now = self.reactor.seconds()
        if state.stored is None:
            return now
        return max(now, renewal_time(state.stored.not_before, state.stored.not_after, self.rng))

    def _schedule(self, state: _NameState, when: float) -> None:
        if state.call is not None and state.call.active():
            state.call.cancel()
        state.next_attempt = when
        if not state.challenges:
            state.call = None
            return
        delay = max(0.0, when - self.reactor.seconds())
        state.call = self.reactor.callLater(delay, self._scheduled_attempt, state)

    def _scheduled_attempt(self, state: _NameState) -> None:
        # The outcome is logged and scheduled by _outcome; nobody else waits for it.
        self._attempt(state, False).addErrback(lambda failure: None)

    def renew(self, name: str | None = None) -> Deferred[Any]:
        """
        Renew now, whether due or not (the Python API for operators and tests):
        one name, or every name.  Fires with the L{IssueResult} (a list of
        them for every name) once the new certificate serves, or fails with
        L{AcmeFailure} (the back-off then goes on as after any failure).
        """
        if name is None:
            from twisted.internet.defer import gatherResults

            return gatherResults([self.renew(n) for n in list(self.states)], consumeErrors=True)
        state = self.states.get(name)
        if state is None:
            return fail(KeyError(f"{name!r} is not an acme name of this configuration"))
        return self._attempt(state, True)

    def _attempt(self, state: _NameState, force: bool) -> Deferred[IssueResult]:
        done: Deferred[IssueResult] = Deferred()
        state.waiters.append(done)
        if state.attempt is not None:
            return done  # one attempt at a time: this one's outcome answers both
        if state.call is not None and state.call.active():
            state.call.cancel()
        state.call = None
        serial = state.stored.serial if state.stored is not None else None
        try:
            attempt = self._issue(state.name, state.challenges, serial, force)
        except Exception:  # noqa: BLE001 - a synchronous failure is a failure like any other
            attempt = fail(Failure())
        state.attempt = attempt
        attempt.addBoth(self._outcome, state)
        return done

    def _outcome(self, result: Any, state: _NameState) -> None:
        state.attempt = None
        waiters, state.waiters = state.waiters, []
        now = self.reactor.seconds()
        if self.states.get(state.name) is not state:
            outcome: Any = result  # the name left the configuration meanwhile
        elif isinstance(result, IssueResult):
            outcome = self._succeeded(state, result, now)
        elif isinstance(result, Failure) and result.check(LockBusy):
            when = now + self.min_backoff
            self._log.info("acme: another process is getting the certificate for {name}; looking in the storage "
                           "folder again at {next}", name=state.name, next=_when(when))
            if self.running:
                self._schedule(state, when)
            outcome = result
        else:
            outcome = self._failed(state, result, now)
        for d in waiters:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)
        if isinstance(outcome, Failure):
            outcome.cleanFailure()

    def _succeeded(self, state: _NameState, result: IssueResult, now: float) -> IssueResult:
        renewed = state.stored is not None
        state.stored = result.stored
        state.failures = 0
        self._reload(state.name)
        stored = result.stored
        when = renewal_time(stored.not_before, stored.not_after, self.rng, result.suggested_renewal)
        what = ("picked up from the storage folder" if not result.issued
                else "renewed" if renewed else "issued")
        self._log.info("acme: certificate for {name} {what}{how} (valid until {until}); next renewal at {next}",
                       name=state.name, what=what, how=f" by {result.challenge}" if result.challenge else "",
                       until=_when(stored.not_after), next=_when(max(now, when)))
        if self.running:
            self._schedule(state, max(now, when))
            self._schedule_ari(state, result.ari_next_poll)
        if self.events is not None and self.events.wanted:
            self.events.publish(CertificateChanged(state.name, "picked up" if not result.issued else
                                                   "renewed" if renewed else "issued", stored.not_after,
                                                   max(now, when)))
        return result

    def _failed(self, state: _NameState, failure: Failure, now: float) -> Failure:
        state.failures += 1
        error = failure.value
        refused = error if isinstance(error, AcmeFailure) else None
        retry_after = refused.retry_after if refused is not None else None
        rate_limited = refused is not None and refused.rate_limited
        delay = backoff(state.failures, self.rng, self.min_backoff, self.max_backoff, retry_after)
        when = now + delay
        if state.stored is not None and when > state.stored.not_after:
            when = max(now + self.min_backoff, min(when, state.stored.not_after - self.min_backoff))
        serving = (f"the certificate valid until {_when(state.stored.not_after)} keeps serving"
                   if state.stored is not None else "the temporary self-signed certificate keeps serving")
        why = str(error) if isinstance(error, AcmeFailure) else f"{type(error).__name__}: {error}"
        self._log.error("acme: {kind} for {name} failed ({count} in a row): {why}; {serving}; next attempt at {next}",
                        kind="rate limited" if rate_limited else "getting a certificate",
                        name=state.name, count=state.failures, why=why, serving=serving, next=_when(when))
        if not isinstance(error, (AcmeFailure, OSError)):
            self._log.failure("acme: unexpected error for {name}", failure, name=state.name)
        if state.stored is None:
            try:
                if self._fresh_temporary(state, now):  # a CA failing for days: the stand-in must not lapse
                    self._reload(state.name)
            except OSError as e:
                self._log.error("acme: cannot renew the temporary certificate for {name}: {why}", name=state.name,
                                why=e)
        if self.running:
            self._schedule(state, when)
        if self.events is not None and self.events.wanted:
            self.events.publish(CertificateFailed(state.name, why, state.failures,
                                                  rate_limited, when))
        return failure

    # -- the CA's renewal information (RFC 9773) --------------------------------------------

    def _schedule_ari(self, state: _NameState, when: float | None) -> None:
        """Ask the renewal information again at C{when}, if that comes before the renewal itself."""
        if state.ari_poll is not None and state.ari_poll.active():
            state.ari_poll.cancel()
        state.ari_poll = None
        if when is None or state.next_attempt is None or when >= state.next_attempt:
            return
        delay = max(self.min_backoff, when - self.reactor.seconds())
        state.ari_poll = self.reactor.callLater(delay, self._poll_ari, state)

    def _poll_ari(self, state: _NameState) -> None:
        state.ari_poll = None
        stored = state.stored
        if stored is None or state.attempt is not None:
            return

        def answered(info: tuple[float | None, float] | None) -> None:
            if info is None or state.stored is not stored or not self.running:
                return  # no longer offered, or the certificate changed meanwhile
            suggested, again = info
            now = self.reactor.seconds()
            if suggested is not None and suggested < stored.not_after and state.next_attempt is not None \
                    and suggested < state.next_attempt:
                when = max(now, suggested)
                self._log.info("acme: the CA's renewal information moves the renewal of {name} to {next}",
                               name=state.name, next=_when(when))
                self._schedule(state, when)
            self._schedule_ari(state, again)

        def failed(failure: Failure) -> None:
            self._log.info("acme: could not read the CA's renewal information for {name}: {why}", name=state.name,
                           why=failure.getErrorMessage())
            if self.running and state.stored is stored:
                self._schedule_ari(state, self.reactor.seconds() + ARI_RETRY)

        try:
            d = self._renewal_info(stored.pem)
        except Exception:  # noqa: BLE001 - as a failed ask
            d = fail(Failure())
        d.addCallbacks(answered, failed)

    def _renewal_info_in_thread(self, pem: bytes) -> Deferred[Any]:
        from .client import renewal_info_blocking

        return self._threads.run(deferToThreadPool, self.reactor, self.reactor.getThreadPool(),
                                 renewal_info_blocking, self.acme, pem)

    def _reload(self, name: str) -> None:
        """Put a name's new certificate into every SNI map that serves it: new handshakes use it, open ones go on."""
        for profile, names in self.profiles.items():
            if name in names:
                for contexts in list(self._contexts.get(profile, ())):
                    contexts.reload()

    # -- the default issuer ------------------------------------------------------------------

    def _issue_in_thread(self, name: str, challenges: tuple[str, ...], serial: int | None,
                         force: bool) -> Deferred[IssueResult]:
        from .client import issue_blocking

        return self._threads.run(deferToThreadPool, self.reactor, self.reactor.getThreadPool(), issue_blocking,
                                 self.acme, self.storage, self.responder, name, challenges, serial, force,
                                 self._in_reactor)

    def _in_reactor(self, function: Callable[..., Any], *args: Any) -> Any:
        """From the issuing thread: run C{function} in the reactor thread and return its result (a bounded wait)."""
        answer: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=1)

        def run() -> None:
            try:
                answer.put((True, function(*args)))
            except Exception as e:  # noqa: BLE001 - handed to the thread
                answer.put((False, e))

        self.reactor.callFromThread(run)
        ok, value = answer.get(timeout=REACTOR_CALL_TIMEOUT)
        if not ok:
            raise value
        return value

    # -- for reading -------------------------------------------------------------------------

    def status(self) -> Mapping[str, Mapping[str, Any]]:
        """Each name: the certificate's expiry (or None: temporary), failures in a row, the next attempt."""
        return {
            name: {"not_after": s.stored.not_after if s.stored else None, "failures": s.failures,
                   "next_attempt": s.next_attempt, "serial": s.stored.serial if s.stored else None}
            for name, s in self.states.items()
        }


def check_acme(config: ProxyConfig) -> None:
    """
    What C{--check} verifies of C{[acme]} beyond its syntax: the CA bundle
    loads, the storage folder is (or can be made) a writable folder, and
    every C{acme} profile a listener serves has names and a challenge this
    config can answer.

    @raise ConfigError: the first problem, in one line.
    """
    from cryptography import x509

    from ..config import ConfigError

    names = acme_names(config)
    if not names:
        return
    acme = config.deferred_sections.get("acme") or AcmeConfig()
    if acme.ca is not None:
        try:
            with open(acme.ca, "rb") as f:
                x509.load_pem_x509_certificates(f.read())
        except OSError as e:
            raise ConfigError(acme.ca, "acme.ca", f"cannot read: {e.strerror or e}") from None
        except ValueError:
            raise ConfigError(acme.ca, "acme.ca", "no PEM certificate in the file") from None
    folder = acme.storage
    while not os.path.exists(folder):
        folder = os.path.dirname(folder) or "."
    if not os.path.isdir(folder):
        raise ConfigError(acme.storage, "acme.storage", f"{folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(acme.storage, "acme.storage", f"{folder} is not writable by this user")
    served = {lc.tls for lc in config.listen if lc.tls}
    for profile, hosts in names.items():
        if profile not in served:
            continue
        if not hosts:
            raise ConfigError(config.source, f"tls.{profile}.acme",
                              "is true, but no route names a host (wildcards cannot be had by http-01 or tls-alpn-01)")
        if not challenge_types(config, profile):
            raise ConfigError(config.source, f"tls.{profile}.acme",
                              f"no listener can answer {list(acme.challenges)} (http-01 needs a plain http listener, "
                              "tls-alpn-01 an http listener on this profile without client_ca)")
