"""
The web application firewall's rule engine, pure: rules read from a TOML
file (one C{[[rule]]} per entry), a request seen as targets (method, path,
query arguments and their names, headers, cookies, the first bytes of the
body), transformations, operators, and anomaly scoring.

Why these choices:
  - regular expressions run on RE2 (C{google-re2}): linear time whatever
    the input, so a hostile request cannot make a rule backtrack for
    seconds (Python's C{re} can);
  - SQL injection and XSS are also judged by libinjection (its tokenizer
    knows SQL and HTML far better than any regex), through the
    C{libinjection-python} binding;
  - a rule adds its C{score}; the request is refused when the total reaches
    the threshold, so one weak signal alone blocks nothing.
"""

from __future__ import annotations

import html
import json
import posixpath
import tomllib
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import unquote_plus

import attrs
import re2

try:
    import libinjection as _libinjection
except ImportError:  # pragma: no cover - a dependency; without it the detect_* operators refuse to load
    _libinjection = None

__all__ = [
    "BurstRule",
    "Rule",
    "RuleError",
    "RuleSet",
    "RequestView",
    "Verdict",
    "default_rules_path",
    "load_rules",
    "parse_rules",
]


class RuleError(Exception):
    """A rule file that cannot be used: C{str()} is one line naming the rule and the problem."""


# -- transformations -------------------------------------------------------------------------

_SQL_COMMENT = re2.compile(r"/\*.*?\*/")


def _url_decode(value: str) -> str:
    """Percent and C{+} decoding, repeated (at most 3 times) so that double encoding does not hide anything."""
    for _ in range(3):
        if "%" not in value and "+" not in value:
            return value
        decoded = unquote_plus(value, errors="replace")
        if decoded == value:
            return value
        value = decoded
    return value


def _html_decode(value: str) -> str:
    return html.unescape(value) if "&" in value else value


def _normalize_path(value: str) -> str:
    if not value:
        return value
    value = value.replace("\\", "/")
    trailing = value.endswith("/")
    out = posixpath.normpath(value)
    return out + "/" if trailing and not out.endswith("/") else out


def _cmdline(value: str) -> str:
    """What a shell reads: quotes, carets and backslashes removed, C{,;} spaced, whitespace compressed, lower case."""
    for c in "\\\"'^":
        value = value.replace(c, "")
    value = value.replace("\n", ";").replace("\r", ";")
    return " ".join(value.replace(",", " ").replace(";", " ; ").split()).lower()


TRANSFORMS: dict[str, Callable[[str], str]] = {
    "url_decode": _url_decode,
    "html_entity_decode": _html_decode,
    "lowercase": str.lower,
    "compress_whitespace": lambda v: " ".join(v.split()),
    "remove_whitespace": lambda v: "".join(v.split()),
    "remove_nulls": lambda v: v.replace("\x00", ""),
    "remove_comments": lambda v: _SQL_COMMENT.sub(" ", v) if "/*" in v else v,
    "normalize_path": _normalize_path,
    "cmdline": _cmdline,
}


# -- operators -------------------------------------------------------------------------------


def _detect_sqli(value: str, ignore: frozenset[str] = frozenset()) -> bool:
    result = _libinjection.is_sql_injection(value)
    return bool(result["is_sqli"]) and result["fingerprint"] not in ignore


def _detect_xss(value: str) -> bool:
    return bool(_libinjection.is_xss(value)["is_xss"])


def _operator(rule_id: str, name: str, pattern: Any, exceptions: Sequence[str] = ()) -> Callable[[str], bool]:
    if name in ("detect_sqli", "detect_xss"):
        if _libinjection is None:
            raise RuleError(f"rule {rule_id}: operator {name} needs the libinjection-python package")
        if name == "detect_xss":
            return _detect_xss
        if exceptions:
            ignore = frozenset(exceptions)
            return lambda value: _detect_sqli(value, ignore)
        return _detect_sqli
    if name == "pm":
        pattern = _pm_regex(rule_id, pattern)
        name = "rx"
    if not isinstance(pattern, str) or not pattern:
        raise RuleError(f"rule {rule_id}: operator {name} needs pattern = a non-empty string")
    if name == "rx":
        options = re2.Options()
        options.max_mem = 8 << 20
        options.log_errors = False
        try:
            search = re2.compile(pattern, options).search
        except re2.error as e:
            raise RuleError(f"rule {rule_id}: pattern is not a valid RE2 expression: {e}") from None
        return lambda value: search(value) is not None
    if name == "contains":
        return lambda value: pattern in value
    if name == "equals":
        return lambda value: value == pattern
    if name == "begins_with":
        return lambda value: value.startswith(pattern)
    if name == "ends_with":
        return lambda value: value.endswith(pattern)
    raise RuleError(f"rule {rule_id}: unknown operator {name!r} "
                    "(rx, pm, contains, equals, begins_with, ends_with, detect_sqli, detect_xss)")


def _pm_regex(rule_id: str, pattern: Any) -> str:
    """A phrase list as one RE2 alternation: a linear scan for all phrases at once."""
    if not isinstance(pattern, list) or not pattern or not all(isinstance(p, str) and p for p in pattern):
        raise RuleError(f"rule {rule_id}: operator pm needs pattern = a list of phrases")
    return "|".join(re2.escape(p) for p in pattern)


def _regex_source(operator: str, pattern: Any) -> str | None:
    """The RE2 expression an rx or pm rule searches for (None for other operators)."""
    if operator == "rx":
        return pattern  # type: ignore[no-any-return]
    if operator == "pm":
        return "|".join(re2.escape(p) for p in pattern)
    return None


# -- targets ---------------------------------------------------------------------------------

TARGETS = ("method", "path", "query", "args", "arg_names", "headers", "header_names", "cookies", "cookie_names",
           "body", "body_names", "user_agent")
"""What a rule can look at; C{header:NAME} is one header's values."""


def _split_pairs(raw: str, sep: str) -> list[tuple[str, str]]:
    out = []
    for part in raw.split(sep):
        if not part:
            continue
        name, _, value = part.partition("=")
        out.append((name.strip() if sep == ";" else name, value))
    return out


_JSON_STRING = re2.compile(r'"((?:[^"\\]|\\.)*)"(\s*:)?')


def _json_strings(text: str) -> tuple[list[str], list[str]]:
    """The string values and the keys of a JSON text, read even when it is cut short (the first N KiB)."""
    values, names = [], []
    for match in _JSON_STRING.finditer(text):
        raw, colon = match.group(1), match.group(2)
        if "\\" in raw:
            try:
                raw = json.loads('"' + raw + '"')
            except ValueError:
                pass
        (names if colon else values).append(raw)
    return values, names


class RequestView:
    """
    A request as the rules see it: each target's values as text, read at
    most once and only when a rule asks (most requests never need the body
    parsed, or the cookies split).
    """

    __slots__ = ("method", "path", "query", "headers", "body", "content_type", "_cache", "line_key")

    def __init__(self, method: bytes, path: bytes, query: bytes, headers: Sequence[tuple[bytes, bytes]],
                 body: bytes | None = None) -> None:
        self.line_key = (method, path, query)
        """The request line's parts as sent: the key of what the rules found in them (L{RuleSet})."""
        self.method = method.decode("latin-1")
        self.path = path.decode("latin-1")
        self.query = query.decode("latin-1")
        self.headers = headers
        self.body = body
        self._cache: dict[Any, Any] = {}

    def values(self, target: str) -> list[str]:
        cache = self._cache
        found = cache.get(target)
        if found is None:
            reader = _READERS.get(target)
            if reader is not None:
                found = reader(self)
            elif target.startswith("header:"):
                found = self._headers().get(target[7:].lower(), [])
            else:
                raise KeyError(target)
            cache[target] = found
        return found  # type: ignore[no-any-return]

    def _headers(self) -> dict[str, list[str]]:
        """The header values by lower-cased name, read in one pass."""
        by_name = self._cache.get("_headers")
        if by_name is None:
            by_name = {}
            for name, value in self.headers:
                key = name.decode("latin-1").lower()
                found = by_name.get(key)
                if found is None:
                    by_name[key] = [value.decode("latin-1")]
                else:
                    found.append(value.decode("latin-1"))
            self._cache["_headers"] = by_name
        return by_name  # type: ignore[no-any-return]

    def _header(self, name: bytes) -> list[str]:
        return self._headers().get(name.decode("latin-1"), [])

    def _all_headers(self) -> list[str]:
        return [v for name, values in self._headers().items() if name not in ("cookie", "host") for v in values]

    def _args(self) -> list[tuple[str, str]]:
        args = self._cache.get("_args")
        if args is None:
            args = self._cache["_args"] = _split_pairs(self.query, "&") if self.query else []
        return args  # type: ignore[no-any-return]

    def _cookies(self) -> list[tuple[str, str]]:
        cookies = self._cache.get("_cookies")
        if cookies is None:
            cookies = []
            for value in self._header(b"cookie"):
                cookies += _split_pairs(value, ";")
            self._cache["_cookies"] = cookies
        return cookies  # type: ignore[no-any-return]

    def _body(self) -> tuple[list[str], list[str]]:
        parsed = self._cache.get("_body")
        if parsed is None:
            parsed = self._cache["_body"] = self._parse_body()
        return parsed  # type: ignore[no-any-return]

    def _parse_body(self) -> tuple[list[str], list[str]]:
        body = self.body
        if not body:
            return [], []
        text = body.decode("utf-8", "replace")
        kind = ""
        for value in self._header(b"content-type"):
            kind = value.split(";", 1)[0].strip().lower()
        if kind == "application/x-www-form-urlencoded":
            pairs = _split_pairs(text, "&")
            return [v for _, v in pairs], [n for n, _ in pairs]
        if kind == "application/json" or kind.endswith("+json"):
            return _json_strings(text)
        return [text], []

    def transformed(self, target: str, transforms: tuple[str, ...]) -> list[str]:
        """A target's values after C{transforms}, computed once per request for each chain."""
        key = (target, transforms)
        cache = self._cache
        found = cache.get(key)
        if found is None:
            values = self.values(target)
            if transforms:
                steps = [TRANSFORMS[t] for t in transforms]
                out = []
                for value in values:
                    for step in steps:
                        value = step(value)
                    out.append(value)
                values = out
            found = cache[key] = values
        return found  # type: ignore[no-any-return]


_READERS: dict[str, Callable[[RequestView], list[str]]] = {
    "method": lambda view: [view.method],
    "path": lambda view: [view.path],
    "query": lambda view: [view.query] if view.query else [],
    "args": lambda view: [v for _, v in view._args()],
    "arg_names": lambda view: [n for n, _ in view._args()],
    "headers": RequestView._all_headers,
    "header_names": lambda view: [n.decode("latin-1") for n, _ in view.headers],
    "cookies": lambda view: [v for _, v in view._cookies()],
    "cookie_names": lambda view: [n for n, _ in view._cookies()],
    "user_agent": lambda view: view._headers().get("user-agent", []),
    "body": lambda view: view._body()[0],
    "body_names": lambda view: view._body()[1],
}


# -- rules -----------------------------------------------------------------------------------


@attrs.frozen
class Rule:
    id: str
    description: str
    targets: tuple[str, ...]
    transforms: tuple[str, ...]
    operator: str
    match: Callable[[str], bool] = attrs.field(repr=False, eq=False)
    score: int = 5
    tags: tuple[str, ...] = ()
    negate: bool = False
    regex: str | None = None
    """For rx and pm rules: the RE2 expression, searched together with the other rules' (L{_Group})."""

    def matches(self, view: RequestView) -> str | None:
        """The first value (after transformations) the rule matches, or None."""
        match = self.match
        for target in self.targets:
            for value in view.transformed(target, self.transforms):
                if match(value) != self.negate:
                    return value
            if self.negate and not view.values(target):
                return ""  # absent counts as "does not match"
        return None


@attrs.frozen
class BurstRule:
    """Behaviour: more than C{count} responses with one of C{statuses} to one client within C{per} seconds."""

    id: str
    description: str
    statuses: frozenset[int]
    count: int
    per: float
    block_for: float


@attrs.frozen
class Verdict:
    score: int
    matched: tuple[tuple[Rule, str], ...]
    """Each rule that matched, with the value it matched (for the log)."""

    def rule_ids(self) -> str:
        return ",".join(rule.id for rule, _ in self.matched)


_CLEAN = Verdict(0, ())


class _Group:
    """
    The rules that read one target after one chain of transformations:
    their regular expressions in one RE2 set (one pass over each value
    finds every rule that matches it), the other operators one by one.
    """

    __slots__ = ("target", "transforms", "regex_rules", "other_rules", "match_set")

    def __init__(self, target: str, transforms: tuple[str, ...], rules: list[Rule]) -> None:
        self.target = target
        self.transforms = transforms
        self.match_set, self.regex_rules = _regex_set([r for r in rules if r.regex is not None])
        self.other_rules = tuple(r for r in rules if r.regex is None)


_PLAIN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/_-.~"
_PLAIN_DELETE = str.maketrans("", "", _PLAIN_CHARS)


def _plain(value: str) -> bool:
    """
    Whether every transformation leaves C{value} as it is, but for case:
    letters, digits and C{/_-.~} only, and nothing a path normalisation
    changes.  Most path segments, tokens and ids are such values.
    """
    return not value.translate(_PLAIN_DELETE) and "/." not in value and "//" not in value and \
        not value.startswith("./")


class _PlainGroups:
    """
    A target's rules for plain values (L{_plain}), whose transformed forms
    are the value itself or its lower case: two RE2 sets instead of one per
    chain of transformations.
    """

    __slots__ = ("same", "same_rules", "lower", "lower_rules", "others")

    def __init__(self, groups: Sequence[_Group]) -> None:
        same: list[Rule] = []
        lower: list[Rule] = []
        self.others: list[tuple[Rule, bool]] = []
        for group in groups:
            lowered = "lowercase" in group.transforms or "cmdline" in group.transforms
            (lower if lowered else same).extend(group.regex_rules)
            self.others += [(rule, lowered) for rule in group.other_rules]
        self.same, self.same_rules = _regex_set(same)
        self.lower, self.lower_rules = _regex_set(lower)

    def judge(self, value: str) -> tuple[tuple[Rule, str], ...]:
        found: list[tuple[Rule, str]] = []
        lowered = value.lower()
        for match, rules, text in ((self.same, self.same_rules, value), (self.lower, self.lower_rules, lowered)):
            if match is not None:
                indexes = match(text.encode("ascii"))
                if indexes:
                    found += [(rules[i], text) for i in indexes]
        for rule, use_lower in self.others:
            text = lowered if use_lower else value
            if rule.match(text):
                found.append((rule, text))
        # A rule in several groups may match twice: once is enough.
        return tuple({rule.id: (rule, text) for rule, text in found}.values())


def _regex_set(rules: Sequence[Rule]) -> tuple[Callable[[bytes], list[int]] | None, tuple[Rule, ...]]:
    """
    One RE2 set of the rules' expressions: a function from UTF-8 text to the
    indexes (in the returned rules) of those that match it, or None for no rules.
    """
    unique = tuple({rule.id: rule for rule in rules}.values())
    if not unique:
        return None, ()
    options = re2.Options()
    options.max_mem = 64 << 20
    options.log_errors = False
    regex_set = re2.Set.SearchSet(options)
    for rule in unique:
        regex_set.Add(rule.regex)
    regex_set.Compile()
    # The compiled set's own Match (google-re2 keeps it as _set): the wrapper's Match only adds a
    # str-or-bytes check per call, and every text given here is bytes already.
    return regex_set._set.Match, unique


def _groups(rules: Sequence[Rule]) -> tuple[tuple[str, tuple[_Group, ...]], ...]:
    """The rules' groups, by target: a target the request lacks skips all of its groups at once."""
    by_key: dict[tuple[str, tuple[str, ...]], list[Rule]] = {}
    for rule in rules:
        if rule.negate:
            continue
        for target in rule.targets:
            by_key.setdefault((target, rule.transforms), []).append(rule)
    by_target: dict[str, list[_Group]] = {}
    for (target, transforms), members in by_key.items():
        by_target.setdefault(target, []).append(_Group(target, transforms, members))
    return tuple((target, tuple(groups)) for target, groups in by_target.items())


class _Chains:
    """
    The chains of transformations of one target's groups as a tree of
    prefixes (C{url_decode}, then C{url_decode, lowercase}...), so that a
    value is put through each step once, however many chains share it.
    """

    __slots__ = ("steps", "group_at")

    def __init__(self, groups: Sequence[_Group]) -> None:
        index: dict[tuple[str, ...], int] = {(): 0}
        self.steps: list[tuple[int, Callable[[str], str]]] = []
        """For each prefix after the empty one: (its parent's index, its last step)."""
        for group in groups:
            chain = group.transforms
            for end in range(1, len(chain) + 1):
                prefix = chain[:end]
                if prefix not in index:
                    index[prefix] = len(self.steps) + 1
                    self.steps.append((index[chain[: end - 1]], TRANSFORMS[chain[end - 1]]))
        self.group_at = [(group, index[group.transforms]) for group in groups]

    def judge(self, raw: str) -> tuple[tuple[Rule, str], ...]:
        """Every rule of the groups that C{raw} matches, with the value as the rule saw it."""
        values = [raw]
        for parent, step in self.steps:
            values.append(step(values[parent]))
        found: list[tuple[Rule, str]] = []
        encoded: dict[int, bytes] = {}
        for group, at in self.group_at:
            value = values[at]
            match = group.match_set
            if match is not None:
                data = encoded.get(at)
                if data is None:
                    data = encoded[at] = value.encode("utf-8", "surrogatepass")
                indexes = match(data)
                if indexes:
                    found += [(group.regex_rules[i], value) for i in indexes]
            for rule in group.other_rules:
                if rule.match(value):
                    found.append((rule, value))
        return tuple(found)


CACHED_VALUE_BYTES = 256
CACHED_VALUES = 4096
CACHED_PART_BYTES = 4096
CACHED_PARTS = 4096

_LINE_TARGETS = frozenset({"method", "path", "query", "args", "arg_names"})
_BODY_TARGETS = frozenset({"body", "body_names"})

Hits = tuple[tuple[Rule, str], ...]


@attrs.frozen
class RuleSet:
    rules: tuple[Rule, ...]
    bursts: tuple[BurstRule, ...] = ()
    source: str = "default"
    inspects_body: bool = False
    _parts: tuple[tuple[tuple[str, tuple[_Group, ...]], ...], ...] = attrs.field(init=False, eq=False, repr=False)
    """The groups by target, split in three parts: the request line's targets, the headers', the body's."""
    _order: dict[str, int] = attrs.field(init=False, eq=False, repr=False)
    _seen: dict[str, dict[str, Hits]] = attrs.field(init=False, eq=False, repr=False)
    """
    Per target, what the rules found in short values already judged
    (bounded): a value's verdict never changes, and ordinary traffic
    repeats its paths, Host, User-Agent and Accept, so most values cost one
    lookup.  The same holds a level up for a whole request line and a whole
    header block (a browser sends the same headers request after request).
    """
    _lines: dict[tuple[bytes, bytes, bytes], Hits] = attrs.field(init=False, eq=False, repr=False)
    _heads: dict[tuple[tuple[bytes, bytes], ...], Hits] = attrs.field(init=False, eq=False, repr=False)
    _negated: bool = attrs.field(init=False, eq=False, repr=False)
    _plain: dict[str, _PlainGroups] = attrs.field(init=False, eq=False, repr=False)
    _chains: dict[str, _Chains] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        by_target = _groups(self.rules)
        parts = (
            tuple((t, g) for t, g in by_target if t in _LINE_TARGETS),
            tuple((t, g) for t, g in by_target if t not in _LINE_TARGETS and t not in _BODY_TARGETS),
            tuple((t, g) for t, g in by_target if t in _BODY_TARGETS),
        )
        object.__setattr__(self, "_parts", parts)
        object.__setattr__(self, "_order", {rule.id: i for i, rule in enumerate(self.rules)})
        object.__setattr__(self, "_seen", {target: {} for target, _ in by_target})
        object.__setattr__(self, "_plain", {target: _PlainGroups(groups) for target, groups in by_target})
        object.__setattr__(self, "_chains", {target: _Chains(groups) for target, groups in by_target})
        object.__setattr__(self, "_lines", {})
        object.__setattr__(self, "_heads", {})
        object.__setattr__(self, "_negated", any(rule.negate for rule in self.rules))

    def _hits(self, view: RequestView, part: tuple[tuple[str, tuple[_Group, ...]], ...]) -> Hits:
        """Every rule (and the value) that matched a target of C{part}, skip lists not applied."""
        found_all: list[tuple[Rule, str]] = []
        seen = self._seen
        for target, groups in part:
            values = view.values(target)
            if not values:
                continue
            verdicts = seen[target]
            for raw in values:
                found = verdicts.get(raw)
                if found is None:
                    found = self._plain[target].judge(raw) if _plain(raw) else self._chains[target].judge(raw)
                    if len(raw) <= CACHED_VALUE_BYTES:
                        if len(verdicts) >= CACHED_VALUES:
                            verdicts.clear()
                        verdicts[raw] = found
                if found:
                    found_all += found
        return tuple(found_all)

    def evaluate(self, view: RequestView, skip: frozenset[str] = frozenset(), stop_at: int | None = None) -> Verdict:
        """
        Run every rule not in C{skip}: each value of each target is
        transformed and searched once for all the rules that read it (their
        regular expressions in one RE2 set); a target the request does not
        have (no query, no cookies, no body) costs nothing.  (C{stop_at} is
        kept for callers: all rules are run, since their findings are
        remembered whole.)
        """
        line_part, head_part, body_part = self._parts
        key = view.line_key
        line = self._lines.get(key)
        if line is None:
            line = self._hits(view, line_part)
            if len(key[1]) + len(key[2]) <= CACHED_PART_BYTES:
                if len(self._lines) >= CACHED_PARTS:
                    self._lines.clear()
                self._lines[key] = line
        headers = view.headers
        head_key = tuple(headers)
        head = self._heads.get(head_key)
        if head is None:
            head = self._hits(view, head_part)
            if sum(len(n) + len(v) for n, v in headers) <= CACHED_PART_BYTES:
                if len(self._heads) >= CACHED_PARTS:
                    self._heads.clear()
                self._heads[head_key] = head
        body = self._hits(view, body_part) if view.body else ()
        if not (line or head or body or self._negated):
            return _CLEAN
        hits: dict[str, tuple[Rule, str]] = {}
        score = 0
        for rule, value in (*line, *head, *body):
            if rule.id not in hits and rule.id not in skip:
                hits[rule.id] = (rule, value)
                score += rule.score
        for rule in self.rules:
            if rule.negate and rule.id not in skip:
                value = rule.matches(view)
                if value is not None:
                    hits[rule.id] = (rule, value)
                    score += rule.score
        order = self._order
        return Verdict(score, tuple(sorted(hits.values(), key=lambda hit: order[hit[0].id])))

    def ids(self) -> set[str]:
        return {r.id for r in self.rules} | {b.id for b in self.bursts}


def _strings(rule_id: str, entry: dict[str, Any], key: str, default: Sequence[str], known: Iterable[str] | None,
             ) -> tuple[str, ...]:
    value = entry.get(key, list(default))
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RuleError(f"rule {rule_id}: {key} must be a list of strings")
    if known is not None:
        known = set(known)
        for v in value:
            if v not in known and not (key == "targets" and v.startswith("header:") and len(v) > 7):
                raise RuleError(f"rule {rule_id}: unknown {key[:-1]} {v!r} (known: {', '.join(sorted(known))})")
    return tuple(value)


_RULE_KEYS = {"id", "description", "targets", "transforms", "operator", "pattern", "score", "tags", "negate", "except"}
_BURST_KEYS = {"id", "description", "status", "count", "per", "block_for"}


def parse_rules(data: dict[str, Any], source: str) -> RuleSet:
    """A rule set from a parsed rule file.  @raise RuleError: naming the rule and the problem."""
    rules: list[Rule] = []
    bursts: list[BurstRule] = []
    seen: set[str] = set()
    unknown = set(data) - {"rule", "burst"}
    if unknown:
        raise RuleError(f"{source}: unknown section {sorted(unknown)[0]!r} (rules are [[rule]] and [[burst]])")
    for index, entry in enumerate(data.get("rule", [])):
        rule_id = str(entry.get("id", f"#{index}"))
        if "id" not in entry or not isinstance(entry["id"], (str, int)):
            raise RuleError(f"{source}: rule[{index}]: id is required (a string)")
        if rule_id in seen:
            raise RuleError(f"{source}: rule {rule_id}: id used twice")
        seen.add(rule_id)
        extra = set(entry) - _RULE_KEYS
        if extra:
            raise RuleError(f"{source}: rule {rule_id}: unknown key {sorted(extra)[0]!r}")
        try:
            targets = _strings(rule_id, entry, "targets", (), TARGETS)
            if not targets:
                raise RuleError(f"rule {rule_id}: targets is required")
            transforms = _strings(rule_id, entry, "transforms", (), TRANSFORMS)
            operator = entry.get("operator", "rx")
            exceptions = _strings(rule_id, entry, "except", (), None)
            match = _operator(rule_id, operator, entry.get("pattern"), exceptions)
        except RuleError as e:
            raise RuleError(f"{source}: {e}") from None
        score = entry.get("score", 5)
        if not isinstance(score, int) or isinstance(score, bool) or score < 0:
            raise RuleError(f"{source}: rule {rule_id}: score must be a whole number >= 0")
        rules.append(Rule(
            id=rule_id,
            description=str(entry.get("description", "")),
            targets=targets,
            transforms=transforms,
            operator=operator,
            match=match,
            score=score,
            tags=tuple(entry.get("tags", ())),
            negate=bool(entry.get("negate", False)),
            regex=_regex_source(operator, entry.get("pattern")),
        ))
    for index, entry in enumerate(data.get("burst", [])):
        rule_id = str(entry.get("id", ""))
        if not rule_id:
            raise RuleError(f"{source}: burst[{index}]: id is required")
        if rule_id in seen:
            raise RuleError(f"{source}: rule {rule_id}: id used twice")
        seen.add(rule_id)
        extra = set(entry) - _BURST_KEYS
        if extra:
            raise RuleError(f"{source}: burst {rule_id}: unknown key {sorted(extra)[0]!r}")
        statuses = entry.get("status", [404])
        count, per, block_for = entry.get("count", 20), entry.get("per", 10.0), entry.get("block_for", 60.0)
        if not (isinstance(statuses, list) and statuses and all(isinstance(s, int) for s in statuses)):
            raise RuleError(f"{source}: burst {rule_id}: status must be a list of status codes")
        if not (isinstance(count, int) and count >= 1 and isinstance(per, (int, float)) and per > 0
                and isinstance(block_for, (int, float)) and block_for > 0):
            raise RuleError(f"{source}: burst {rule_id}: count, per and block_for must be positive numbers")
        bursts.append(BurstRule(rule_id, str(entry.get("description", "")), frozenset(statuses), count, float(per),
                                float(block_for)))
    body = any(t in ("body", "body_names") for rule in rules for t in rule.targets)
    return RuleSet(tuple(rules), tuple(bursts), source, body)


def default_rules_path() -> str:
    import os

    return os.path.join(os.path.dirname(__file__), "rules", "default.toml")


def load_rules(path: str) -> RuleSet:
    """Read a rule file (C{"default"}: the bundled one).  @raise RuleError: one line saying what is wrong."""
    if path == "default":
        path = default_rules_path()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise RuleError(f"{path}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise RuleError(f"{path}: not valid TOML: {e}") from None
    return parse_rules(data, path)
