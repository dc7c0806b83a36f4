"""
Configuration: every refusal is one line naming the file, the key and the
problem; the sample and the contract load; and the twistd entry point
checks a config and exits with the right status and message.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from rproxy_tw.config import ConfigError, load_config, parse_config, quick_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "etc", "rproxy.toml")
CONTRACT = os.path.join(os.path.dirname(ROOT), "shared", "config-contract.toml")
if not os.path.exists(CONTRACT):
    CONTRACT = "/work/shared/config-contract.toml"

BASE = """
[[listen]]
endpoint = "tcp:8080"

[[route]]
path = "/"
pool = "web"

[pool.web]
backends = ["tcp:127.0.0.1:8001"]
"""


def write(tmp_path, text: str, name: str = "rproxy.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def refusal(path: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


def assert_one_line(message: str, path: str, key: str, *fragments: str) -> None:
    assert "\n" not in message, message
    assert "Traceback" not in message
    prefix = f"{path}: {key}: " if key else f"{path}: "
    assert message.startswith(prefix), f"{message!r} does not start with {prefix!r}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# ---------------------------------------------------------------------------
# Refusals: (TOML text, key, fragments of the problem)

CASES = {
    "bad type string": (BASE + "[server]\naccess_log = 5\n", "server.access_log", "must be a string", "integer"),
    "route path with dot segments": (BASE.replace('path = "/"', 'path = "/api/../admin/"'), "route[0].path",
                                     "matched normalised", "'/admin/'"),
    "route path climbing above the root": (BASE.replace('path = "/"', 'path = "/../x"'), "route[0].path",
                                           "climbs above the root"),
    "bad type number": (BASE.replace('backends = ["tcp:127.0.0.1:8001"]',
                                     'backends = ["tcp:127.0.0.1:8001"]\nconnect_timeout = "5s"'),
                        "pool.web.connect_timeout", "must be a number"),
    "boolean as number": (BASE.replace('backends = ["tcp:127.0.0.1:8001"]',
                                       'backends = ["tcp:127.0.0.1:8001"]\nkeepalive = true'),
                          "pool.web.keepalive", "boolean"),
    "negative timeout": (BASE.replace('backends = ["tcp:127.0.0.1:8001"]',
                                      'backends = ["tcp:127.0.0.1:8001"]\nresponse_timeout = -1'),
                         "pool.web.response_timeout", "greater than 0"),
    "unknown top-level key": ('colour = "blue"\n' + BASE, "colour", "not a known key"),
    "unknown pool key": (BASE.replace("backends =", "backend = ").replace(
        'backend =  ["tcp:127.0.0.1:8001"]', 'backends = ["tcp:127.0.0.1:8001"]\nbakends = 1'),
        "pool.web.bakends", "not a known key"),
    "unknown listen key": (BASE.replace('endpoint = "tcp:8080"', 'endpoint = "tcp:8080"\nport = 8080'),
                           "listen[0].port", "not a known key"),
    "unknown server key": (BASE + "[server]\ntrusted_proxy = []\n", "server.trusted_proxy", "not a known key"),
    "unknown limits key": (BASE + "[limits]\nmax_uri = 10\n", "limits.max_uri", "not a known key"),
    "missing pool reference": (BASE.replace('pool = "web"', 'pool = "nope"'), "route[0].pool", "'nope'"),
    "missing tls reference": (BASE.replace('endpoint = "tcp:8080"', 'endpoint = "tcp:8080"\ntls = "main"'),
                              "listen[0].tls", "'main'"),
    "bad listen endpoint": (BASE.replace('endpoint = "tcp:8080"', 'endpoint = "tcp:eighty"'),
                            "listen[0].endpoint", "tcp:eighty"),
    "unknown listen endpoint type": (BASE.replace('endpoint = "tcp:8080"', 'endpoint = "pigeon:8080"'),
                                     "listen[0].endpoint", "pigeon"),
    "bad backend endpoint": (BASE.replace('"tcp:127.0.0.1:8001"', '"127.0.0.1:8001"'),
                             "pool.web.backends[0]", "unknown endpoint type"),
    "backend without port": (BASE.replace('"tcp:127.0.0.1:8001"', '"tcp:127.0.0.1"'),
                             "pool.web.backends[0]", "tcp:HOST:PORT"),
    "empty backends": (BASE.replace('["tcp:127.0.0.1:8001"]', "[]"), "pool.web.backends", "at least one"),
    "missing backends": (BASE.replace('backends = ["tcp:127.0.0.1:8001"]', 'balance = "round_robin"'),
                         "pool.web.backends", "required"),
    "bad balance": (BASE.replace('backends = ["tcp:127.0.0.1:8001"]',
                                 'backends = ["tcp:127.0.0.1:8001"]\nbalance = "fastest"'),
                    "pool.web.balance", "fastest"),
    "route path without slash": (BASE.replace('path = "/"', 'path = "api"'), "route[0].path", "start with '/'"),
    "bad host pattern": (BASE.replace('path = "/"', 'host = "*bad*.example.com"\npath = "/"'),
                         "route[0].host", "*bad*.example.com"),
    "duplicate route": (BASE + '[[route]]\npath = "/"\npool = "web"\n', "route[1].path", "duplicates route[0]"),
    "bad trusted proxy": (BASE + '[server]\ntrusted_proxies = ["10.0.0.0/8", "not-an-ip"]\n',
                          "server.trusted_proxies[1]", "not an IP network"),
    "bad log format": (BASE + '[server]\naccess_log_format = "xml"\n', "server.access_log_format", "'xml'"),
    "bad log level": (BASE + '[server]\nlog_level = "verbose"\n', "server.log_level", "'verbose'"),
    "limit too small": (BASE + "[limits]\nmax_headers = 0\n", "limits.max_headers", "at least 1"),
    "listen not an array": ('listen = "tcp:8080"\n' + BASE.replace('[[listen]]\nendpoint = "tcp:8080"\n', ""),
                            "listen", "array"),
    "pool not a table": ("pool = 3\n" + BASE.replace('[pool.web]\nbackends = ["tcp:127.0.0.1:8001"]', ""),
                         "pool", "table"),
    "bad protocol": (BASE.replace('endpoint = "tcp:8080"', 'endpoint = "tcp:8080"\nprotocol = "gopher"'),
                     "listen[0].protocol", "'gopher'"),
    # Two listeners that cannot both listen.
    "same endpoint spelled twice": (BASE + '[[listen]]\nendpoint = "tcp:port=8080"\n', "listen[1].endpoint",
                                    "'tcp:port=8080' overlaps listen[0].endpoint 'tcp:8080'"),
    "all interfaces and one": (BASE + '[[listen]]\nendpoint = "tcp:8080:interface=127.0.0.1"\n',
                               "listen[1].endpoint", "overlaps listen[0].endpoint"),
    "ipv6 wildcard is dual-stack": (BASE + '[[listen]]\nendpoint = "tcp6:8080"\n', "listen[1].endpoint", "overlaps"),
    "haproxy wrapper same port": (BASE + '[[listen]]\nendpoint = "haproxy:tcp:8080"\n', "listen[1].endpoint",
                                  "overlaps"),
    "admin on a listener's port": (BASE + '[admin]\nendpoint = "tcp:8080:interface=127.0.0.1"\n', "admin.endpoint",
                                   "overlaps listen[0].endpoint"),
    # Contract keys whose capability has not landed: validated all the same.
    "cache unknown key": (BASE + "[cache]\nmax_size = 10\n", "cache.max_size", "not a known key"),
    "cache negative size": (BASE + "[cache]\nmax_bytes = -1\n", "cache.max_bytes", "at least 0"),
    "cache compress": (BASE + '[cache]\ncompress = ["zstd"]\n', "cache.compress[0]", "'zstd'"),
    "cache store": (BASE + '[cache]\nstore = "tape"\n', "cache.store", "'tape'"),
    "cache disk without path": (BASE + '[cache]\nstore = "disk"\n', "cache.path", "required"),
    "cache redis without cluster": (BASE + '[cache]\nstore = "redis"\n', "cache.store", "[cluster]"),
    "route compress coding": (BASE.replace('pool = "web"', 'pool = "web"\ncompress = ["zstd"]'),
                              "route[0].compress[0]", "'zstd'"),
    "route compress kind": (BASE.replace('pool = "web"', 'pool = "web"\ncompress = 3'), "route[0].compress",
                            "must be"),
    "waf mode": (BASE + '[waf]\nmode = "strict"\n', "waf.mode", "'strict'"),
    "waf deny": (BASE + '[waf]\ndeny = ["10.0.0.0/8", "ten"]\n', "waf.deny[1]", "not an IP network"),
    "waf unknown key": (BASE + '[waf]\nrule = "default"\n', "waf.rule", "not a known key"),
    "rate limit requests": (BASE + "[rate_limit]\nrequests = 0\n", "rate_limit.requests", "at least 1"),
    "rate limit per": (BASE + "[rate_limit]\nper = 0\n", "rate_limit.per", "greater than 0"),
    "rate limit key": (BASE + '[rate_limit]\nkey = "cookie:sid"\n', "rate_limit.key", "header:NAME"),
    "rate limit store": (BASE + '[rate_limit]\nstore = "redis"\n', "rate_limit.store", "[cluster]"),
    "rate limit on_store_error": (BASE + '[rate_limit]\non_store_error = "panic"\n', "rate_limit.on_store_error",
                                  "'panic'"),
    "cluster needs redis": (BASE + '[cluster]\nkey_prefix = "x:"\n', "cluster.redis", "required"),
    "cluster redis endpoint": (BASE + '[cluster]\nredis = "127.0.0.1:6379"\n', "cluster.redis",
                               "unknown endpoint type"),
    "admin token": (BASE + "[admin]\ntoken = 5\n", "admin.token", "must be a string"),
    "admin unknown key": (BASE + '[admin]\npassword = "x"\n', "admin.password", "not a known key"),
    "acme directory": (BASE + '[acme]\ndirectory = "acme.example.com"\n', "acme.directory", "http(s) URL"),
    "acme challenges": (BASE + '[acme]\nchallenges = ["dns-01"]\n', "acme.challenges[0]", "'dns-01'"),
    "acme unknown key": (BASE + '[acme]\nemails = "a@b"\n', "acme.emails", "not a known key"),
    "tls acme wildcard": (BASE + '[tls.auto]\nacme = ["*.example.com"]\n', "tls.auto.acme[0]", "wildcards"),
    "tls acme not a list": (BASE + '[tls.auto]\nacme = "www.example.com"\n', "tls.auto.acme", "true or false or a list"),
    "tls without certificates or acme": (BASE + "[tls.main]\nmin_version = \"1.2\"\n", "tls.main.certificates",
                                         "required"),
    "workers zero": (BASE + "[server]\nworkers = 0\n", "server.workers", "positive integer or \"auto\""),
    "workers word": (BASE + '[server]\nworkers = "many"\n', "server.workers", "'many'"),
    "reuseport word": (BASE + '[server]\nreuseport = "yes"\n', "server.reuseport", "true or false"),
    "shutdown timeout negative": (BASE + "[server]\nshutdown_timeout = -1\n", "server.shutdown_timeout",
                                  "at least 0"),
    "pool idle timeout negative": (BASE.replace('backends = ["tcp:127.0.0.1:8001"]',
                                                'backends = ["tcp:127.0.0.1:8001"]\nidle_timeout = -1'),
                                   "pool.web.idle_timeout", "at least 0"),
}


@pytest.mark.parametrize("text,key,fragments", [(c[0], c[1], c[2:]) for c in CASES.values()], ids=CASES.keys())
def test_refusal_names_file_key_and_problem(tmp_path, text, key, fragments):
    path = write(tmp_path, text)
    error = refusal(path)
    assert_one_line(str(error), path, key, *fragments)
    assert error.source == path and error.key == key


def test_base_config_is_valid(tmp_path):
    config = load_config(write(tmp_path, BASE))
    assert [lc.endpoint for lc in config.listen] == ["tcp:8080"]
    assert config.pools["web"].backends[0].endpoint == "tcp:127.0.0.1:8001"


def test_bad_toml(tmp_path):
    path = write(tmp_path, BASE + "[server\naccess_log = \"-\"\n")
    error = refusal(path)
    assert_one_line(str(error), path, "", "not valid TOML")


def test_missing_file(tmp_path):
    path = str(tmp_path / "absent.toml")
    error = refusal(path)
    assert_one_line(str(error), path, "", "cannot read")


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(BASE.encode() + b'[server]\nvia = "caf\xe9"\n')
    error = refusal(str(path))
    assert_one_line(str(error), str(path), "", "UTF-8")


def test_parse_config_names_its_source():
    with pytest.raises(ConfigError) as info:
        parse_config({"listen": [{"endpoint": "tcp:8080", "colour": 1}]}, source="inline.toml")
    assert str(info.value) == "inline.toml: listen[0].colour: is not a known key"


def test_quick_config():
    config = quick_config(["tcp:8081", "tcp:8082"], ["tcp:127.0.0.1:9000", "tcp:127.0.0.1:9001"])
    assert [lc.endpoint for lc in config.listen] == ["tcp:8081", "tcp:8082"]
    assert [b.endpoint for b in config.pools["default"].backends] == ["tcp:127.0.0.1:9000", "tcp:127.0.0.1:9001"]
    assert [(r.path, r.pool) for r in config.routes] == [("/", "default")]
    assert [lc.endpoint for lc in quick_config([], ["tcp:127.0.0.1:9000"]).listen] == ["tcp:8080"]
    with pytest.raises(ConfigError) as info:
        quick_config(["tcp:8080"], ["localhost:9000"])
    assert "\n" not in str(info.value) and "backends[0]" in str(info.value)


def test_defaults_are_sane():
    config = parse_config({"route": [{"pool": "p"}], "pool": {"p": {"backends": ["tcp:127.0.0.1:1"]}}})
    pool = config.pools["p"]
    assert 0 < pool.connect_timeout <= 30
    assert 0 < pool.response_timeout <= 300
    assert 0 < pool.idle_timeout <= 300
    assert pool.keepalive > 0
    assert config.limits.max_body_bytes == 0 or config.limits.max_body_bytes >= 1024 * 1024
    assert config.server.trusted_proxies == ()
    assert config.server.via and "/" not in config.server.via  # a pseudonym, no version


# ---------------------------------------------------------------------------
# The sample and the contract


def test_sample_config_loads():
    config = load_config(SAMPLE)
    assert config.source == SAMPLE
    assert config.listen and all(lc.protocol == "http" for lc in config.listen)
    assert config.routes
    for route in config.routes:
        assert route.pool in config.pools
    if config.demo_origin is not None:
        assert os.path.isdir(config.demo_origin.root), "the demo origin's root must ship with the sample"


def test_contract_loads_with_its_meaning(tmp_path):
    # A copy in an empty folder: the certificates it names do not exist, and must not be opened.
    path = str(tmp_path / "contract.toml")
    shutil.copy(CONTRACT, path)
    config = load_config(path)
    assert config.server.access_log == "-"
    assert config.server.access_log_format == "combined"
    assert [str(n) for n in config.server.trusted_proxies] == ["127.0.0.1/32"]
    assert config.admin_endpoint == "tcp:9901:interface=127.0.0.1"
    assert [(lc.endpoint, lc.protocol, lc.tls, lc.pool) for lc in config.listen] == [
        ("tcp:8080", "http", None, None),
        ("tcp:8443", "http", "main", None),
        ("tcp:6380", "tcp", "main", "legacy"),
    ]
    assert config.listen[2].proxy_protocol == "off"
    main = config.tls["main"]
    assert [c.cert for c in main.certificates] == [str(tmp_path / "certs/www.pem"), str(tmp_path / "certs/api.pem")]
    assert main.certificates[0].key == str(tmp_path / "certs/www.key")
    assert main.min_version == "1.2" and list(main.alpn) == ["h2", "http/1.1"]
    assert [(r.host, r.path, r.pool, r.strip_prefix, r.cache) for r in config.routes] == [
        ("www.example.com", "/", "web", False, False),
        ("www.example.com", "/api/", "api", True, True),
    ]
    web = config.pools["web"]
    assert [b.endpoint for b in web.backends] == ["tcp:127.0.0.1:8001", "tcp:127.0.0.1:8002"]
    assert web.balance == "round_robin"
    assert web.health is not None
    assert (web.health.type, web.health.path, web.health.interval, web.health.timeout, web.health.rise,
            web.health.fall) == ("http", "/healthz", 2.0, 1.0, 2, 2)
    assert config.pools["legacy"].balance == "least_conn"
    limits = config.limits
    assert (limits.max_request_line, limits.max_header_bytes, limits.max_headers, limits.max_body_bytes,
            limits.header_timeout, limits.idle_timeout) == (8192, 16384, 100, 104857600, 10.0, 60.0)


def test_contract_in_place_loads():
    assert load_config(CONTRACT).pools.keys() >= {"web", "api", "legacy"}


# ---------------------------------------------------------------------------
# The twistd entry point (subprocesses, from an unrelated folder)

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
TWIST = [sys.executable, "-m", "twisted"]


def run(argv: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=str(cwd), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("runner", [TWISTD, TWIST], ids=["twistd", "twist"])
def test_check_accepts_sample(tmp_path, runner):
    result = run(runner + ["rproxy", "--config", SAMPLE, "--check"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("runner", [TWISTD, TWIST], ids=["twistd", "twist"])
def test_check_refuses_broken_config_with_one_line(tmp_path, runner):
    path = write(tmp_path, BASE.replace('pool = "web"', 'pool = "nope"'), "broken.toml")
    result = run(runner + ["rproxy", "--config", path, "--check"], tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert_one_line(lines[0], path, "route[0].pool", "nope")
    assert "Traceback" not in result.stdout


def test_check_refuses_bad_toml_with_one_line(tmp_path):
    path = write(tmp_path, "[server\n", "bad.toml")
    result = run(TWISTD + ["rproxy", "--config", path, "--check"], tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert_one_line(lines[0], path, "", "not valid TOML")


def test_check_refuses_missing_file(tmp_path):
    path = str(tmp_path / "nowhere.toml")
    result = run(TWISTD + ["rproxy", "--config", path, "--check"], tmp_path)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(path + ": ")


def test_running_with_broken_config_refuses_without_traceback(tmp_path):
    path = write(tmp_path, BASE + "[server]\naccess_log = 5\n", "broken.toml")
    result = run(TWISTD + ["-n", "rproxy", "--config", path], tmp_path)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "Traceback" not in out
    assert f"{path}: server.access_log: must be a string" in out


def test_plugin_help_from_any_folder(tmp_path):
    result = run(TWISTD + ["rproxy", "--help"], tmp_path)
    assert result.returncode == 0
    assert "--config" in result.stdout and "--listen" in result.stdout and "--backend" in result.stdout


def test_log_level_filters_the_proxys_own_events():
    from twisted.logger import Logger, globalLogPublisher

    from rproxy_tw.logs import observer, set_level

    seen = []
    globalLogPublisher.addObserver(seen.append)
    log = Logger(namespace="rproxy_tw.test", observer=observer)
    try:
        assert parse_config({"route": [{"pool": "p"}], "pool": {"p": {"backends": ["tcp:127.0.0.1:1"]}}}).server.log_level == "info"
        set_level("info")
        log.debug("probe result {n}", n=1)
        log.info("backend up")
        set_level("debug")
        log.debug("probe result {n}", n=2)
        set_level("error")
        log.warn("backend down")
    finally:
        set_level("info")
        globalLogPublisher.removeObserver(seen.append)
    texts = [e["log_format"] for e in seen if e.get("log_namespace") == "rproxy_tw.test"]
    assert texts == ["backend up", "probe result {n}"]
    assert [e["n"] for e in seen if e.get("log_format") == "probe result {n}"] == [2]


def test_log_level_option_overrides_the_config(tmp_path):
    from twisted.python import usage

    from rproxy_tw.tap import Options

    path = tmp_path / "p.toml"
    path.write_text(BASE + '[server]\nlog_level = "warn"\n')
    options = Options()
    options.parseOptions(["--config", str(path)])
    assert options.proxy_config.server.log_level == "warn"
    options = Options()
    options.parseOptions(["--config", str(path), "--log-level", "debug"])
    assert options.proxy_config.server.log_level == "debug"
    with pytest.raises(usage.UsageError, match="--log-level"):
        Options().parseOptions(["--config", str(path), "--log-level", "loud"])


# ---------------------------------------------------------------------------
# Accepted but not enforced: one warning each, the same at a start and with --check

CONTRACT_WARNINGS = [
    "[cluster] is accepted but not enforced by this version",
]


def test_contract_not_enforced_parts_are_named_once_each():
    from rproxy_tw.config import not_enforced_warnings

    config = load_config(CONTRACT)
    assert not_enforced_warnings(config) == CONTRACT_WARNINGS
    assert config.server.workers == 1 and config.server.shutdown_timeout == 30.0 and config.server.reuseport
    assert config.tls["auto"].acme == ("www.example.com", "example.com") and config.tls["auto"].certificates == ()
    acme = config.deferred_sections["acme"]
    assert acme.challenges == ("http-01", "tls-alpn-01") and acme.ca is None
    assert config.cache.compress == ("gzip", "br") and config.routes[1].cache
    assert config.rate_limit.burst == 200 and config.waf.mode == "block" and config.waf.deny == ()
    assert config.deferred_sections["cluster"].redis == "tcp:127.0.0.1:6379"
    assert config.admin is not None and config.admin.token == ""
    assert config.admin.endpoint == "tcp:9901:interface=127.0.0.1"


def test_a_config_without_them_has_no_warnings(tmp_path):
    from rproxy_tw.config import not_enforced_warnings

    assert not_enforced_warnings(load_config(write(tmp_path, BASE))) == []
    assert not_enforced_warnings(load_config(write(tmp_path, BASE + "[server]\nworkers = 1\n"))) == []
    # Enforced now: a graceful stop waits this long (see tests/test_graceful_stop.py).
    timed = load_config(write(tmp_path, BASE + "[server]\nshutdown_timeout = 5\n"))
    assert not_enforced_warnings(timed) == [] and timed.server.shutdown_timeout == 5.0
    assert load_config(write(tmp_path, BASE)).server.shutdown_timeout == 30.0
    assert not_enforced_warnings(load_config(write(tmp_path, BASE + '[server]\nworkers = "auto"\n'))) == []


NOT_ENFORCED = BASE.replace('pool = "web"', 'pool = "web"\ncache = true') + """
[cluster]
redis = "tcp:127.0.0.1:6379"

[cache]
max_bytes = 1048576
store = "redis"
"""
NOT_ENFORCED_WARNINGS = [
    "[cluster] is accepted but not enforced by this version",
    'cache.store = "redis" is accepted but not enforced by this version (the memory store serves)',
]


def test_check_prints_the_warnings_a_start_logs(tmp_path):
    path = write(tmp_path, NOT_ENFORCED)
    result = run(TWISTD + ["rproxy", "--config", path, "--check"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}: ok\n"
    assert result.stderr.splitlines() == [f"{path}: warning: {line}" for line in NOT_ENFORCED_WARNINGS]


def test_service_start_logs_the_same_warnings(tmp_path):
    from twisted.internet.task import Clock
    from twisted.logger import globalLogPublisher

    from rproxy_tw import ProxyService

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        ProxyService(load_config(write(tmp_path, NOT_ENFORCED)), Clock())
    finally:
        globalLogPublisher.removeObserver(seen.append)
    warnings = [e["warning"] for e in seen if e.get("log_format") == "{warning}"]
    assert warnings == NOT_ENFORCED_WARNINGS


def test_acme_profile_starts_on_a_temporary_certificate_and_check_accepts_it(tmp_path):
    import stat

    from twisted.internet.task import Clock

    from rproxy_tw import ProxyService

    text = BASE + '[[listen]]\nendpoint = "tcp:8443"\ntls = "auto"\n\n[tls.auto]\nacme = ["www.example.com"]\n' \
        '\n[acme]\nstorage = "state"\n'
    path = write(tmp_path, text)
    config = load_config(path)
    assert config.tls["auto"].certificates == ()
    clock = Clock()
    clock.advance(1_800_000_000)
    service = ProxyService(config, clock)
    assert service.acme.status()["www.example.com"]["not_after"] is None  # nothing issued yet
    temporary = tmp_path / "state" / "temporary" / "www.example.com.pem"
    assert stat.S_IMODE(temporary.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    result = run(TWISTD + ["rproxy", "--config", path, "--check"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "acme" not in result.stderr


def test_check_refuses_an_acme_ca_bundle_that_is_not_pem(tmp_path):
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    text = BASE + '[tls.auto]\nacme = ["www.example.com"]\n\n[acme]\nca = "ca.pem"\nstorage = "state"\n'
    path = write(tmp_path, text)
    result = run(TWISTD + ["rproxy", "--config", path, "--check"], tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"{tmp_path / 'ca.pem'}: acme.ca: no PEM certificate in the file"


def test_idle_timeout_zero_means_none():
    import math

    config = parse_config({
        "listen": [{"endpoint": "tcp:6380", "protocol": "tcp", "pool": "p", "idle_timeout": 0}],
        "pool": {"p": {"backends": ["tcp:127.0.0.1:6379"], "idle_timeout": 0}}})
    assert config.pools["p"].idle_timeout == math.inf
    assert config.listen[0].idle_timeout == math.inf
    default = parse_config({"listen": [{"endpoint": "tcp:6380", "protocol": "tcp", "pool": "p"}],
                            "pool": {"p": {"backends": ["tcp:127.0.0.1:6379"]}}})
    assert default.listen[0].idle_timeout >= 3600, "raw TCP sessions may be quiet for long"


def test_route_compress_follows_the_cache_section_unless_it_says(tmp_path):
    def route_compress(line: str) -> object:
        return load_config(write(tmp_path, BASE.replace('pool = "web"', 'pool = "web"\n' + line))).routes[0].compress

    assert route_compress("") is None
    assert route_compress("compress = false") == ()
    assert route_compress("compress = true") == ("gzip", "br")
    assert route_compress('compress = ["gzip"]') == ("gzip",)
