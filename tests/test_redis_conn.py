"""The Redis client factory (tasks/redis_conn.py): which URLs it takes, what it builds from them,
and that a password never shows. Real Redis where a client is built; no deployment."""

from __future__ import annotations

import time

import pytest
import redis
import redis.sentinel

from config import ConfigError, Settings
from conftest import free_port, make_settings
from tasks import redis_conn
from tasks.celery_app import make_celery, publish_retry_policy

SENTINELS = "sentinel://:pw@127.0.0.1:26379/3;sentinel://127.0.0.1:26380"


def settings(url: str, **redis_section) -> Settings:
    return Settings.model_validate({"redis_url": url, "redis": redis_section})


def test_a_plain_url_is_one_server():
    target = redis_conn.parse(settings("redis://:secret@127.0.0.1:6379/4"))
    assert not target.is_sentinel and target.password == "secret" and target.db == 4


def test_a_sentinel_list_names_every_sentinel_and_takes_password_and_db_from_the_first():
    target = redis_conn.parse(settings(SENTINELS, sentinel_master="llmq"))
    assert target.sentinels == (("127.0.0.1", 26379), ("127.0.0.1", 26380))
    assert (target.master, target.password, target.db) == ("llmq", "pw", 3)


def test_sentinels_without_a_master_name_fail_at_config_load_by_key():
    with pytest.raises(ConfigError, match="redis.sentinel_master"):
        make_settings(SENTINELS)


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "redis://a:1;redis://b:2", "redis://h:1/x"])
def test_urls_that_name_no_redis_are_refused_without_their_password(url):
    with pytest.raises(redis_conn.RedisURLError) as refused:
        redis_conn.parse(settings(url.replace("://", "://:hunter2@", 1)))
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:hunter2@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("rediss://user:hunter2@host/1", "rediss://user:***@host/1"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("sentinel://:hunter2@h:1;sentinel://:hunter2@h:2", "sentinel://:***@h:1;sentinel://:***@h:2"),
])
def test_mask_hides_every_password(url, shown):
    assert redis_conn.mask(url) == shown


def test_the_config_password_fills_in_where_the_url_has_none_and_the_url_wins():
    s = settings("redis://127.0.0.1:6379/0", password="p:w@d")
    assert redis_conn.parse(s).password == "p:w@d"
    assert redis_conn.broker_url(s) == "redis://:p%3Aw%40d@127.0.0.1:6379/0"
    assert redis_conn.parse(settings("redis://:own@h:1/0", password="cfg")).password == "own"
    assert "hunter2" not in repr(settings("redis://h:1/0", password="hunter2"))


def test_celery_gets_kombus_sentinel_transport_options_and_a_retry_that_spans_a_failover():
    s = settings(SENTINELS, sentinel_master="llmq", failover_wait_s=5)
    conf = make_celery(s).conf
    assert conf.broker_transport_options["master_name"] == "llmq"
    assert conf.broker_url.startswith("sentinel://")
    policy = publish_retry_policy(s)
    assert policy["max_retries"] * policy["interval_max"] >= 5
    plain = make_celery(settings("redis://h:1/0")).conf
    assert "master_name" not in plain.broker_transport_options
    assert publish_retry_policy(settings("redis://h:1/0"))["max_retries"] == 1


def test_a_sentinel_client_is_managed_by_sentinel_and_retries_a_plain_one_does_not():
    s = settings(SENTINELS, sentinel_master="llmq")
    managed = redis_conn.client(s)
    assert isinstance(managed.connection_pool, redis.sentinel.SentinelConnectionPool)
    assert isinstance(managed.connection_pool.connection_kwargs["retry"], redis_conn.FailoverRetry)
    reader = redis_conn.dedicated(managed)
    assert isinstance(reader.connection_pool, redis.sentinel.SentinelConnectionPool)
    assert "retry" not in reader.connection_pool.connection_kwargs  # a blocking reader hears of a loss at once
    assert "retry" not in redis_conn.client(settings("redis://127.0.0.1:6379/0")).connection_pool.connection_kwargs


def test_a_sentinel_client_waits_at_most_failover_wait_s_for_a_master():
    # Sentinels that nobody runs: every lookup fails, and the command gives up after the wait.
    s = settings(f"sentinel://127.0.0.1:{free_port()}", sentinel_master="llmq", failover_wait_s=1.0)
    client = redis_conn.client(s)
    start = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        client.ping()
    assert 1.0 <= time.monotonic() - start < 3.0


def test_a_plain_client_reaches_redis_with_the_config_password(scratch_redis_url):
    # The test Redis has no password, and AUTH with one it does not need fails: the client sends it.
    s = Settings.model_validate({"redis_url": scratch_redis_url, "redis": {"password": "hunter2"}})
    with pytest.raises(redis.AuthenticationError):
        redis_conn.client(s).ping()
    assert redis_conn.client(Settings(redis_url=scratch_redis_url)).ping()


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    """A redis-server on a TLS port only, with a password and a certificate from a CA made here.
    Skipped where redis-server was built without TLS or openssl is missing."""
    import shutil
    import subprocess

    from conftest import wait_for

    server, openssl = shutil.which("redis-server"), shutil.which("openssl")
    if not server or not openssl:
        pytest.skip("redis-server or openssl is not installed")
    d = tmp_path_factory.mktemp("tls")

    def run(*argv: str) -> None:
        subprocess.run([openssl, *argv], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
        "-subj", "/CN=llmq-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "server.crt", "-days", "1", "-extfile", "san.ext")
    port = free_port()
    proc = subprocess.Popen([server, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(d / "server.crt"), "--tls-key-file", str(d / "server.key"),
                             "--tls-ca-cert-file", str(d / "ca.crt"), "--tls-auth-clients", "no",
                             "--requirepass", "tls-pw", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"rediss://:tls-pw@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={d / 'ca.crt'}"
    try:
        time.sleep(0.1)
        if proc.poll() is not None:
            pytest.skip(f"redis-server has no TLS here: {proc.stdout.read().decode()[-300:] if proc.stdout else ''}")

        def answers() -> bool:
            try:
                return bool(redis_conn.client(Settings(redis_url=url)).ping())
            except redis.ConnectionError:
                return False

        wait_for(answers, 15, "the TLS Redis")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_rediss_with_a_password_works_for_direct_clients_and_the_broker(tls_redis):
    s = Settings(redis_url=tls_redis)
    assert redis_conn.client(s).set("llmq:test:tls", 1, ex=60)
    celery = make_celery(s)
    celery.send_task("tasks.generate", args=[{}], queue="llmq.test.tls")  # kombu's rediss:// transport
    assert redis_conn.client(s).llen("llmq.test.tls") == 1
    assert "tls-pw" not in redis_conn.mask(tls_redis)


def test_no_live_worker_is_a_503_with_retry_after():
    # During a failover a worker's consumer reconnects, and it holds no lease meanwhile.
    from flask import Flask

    from app.errors import NoWorkers, register_error_handlers

    app = Flask(__name__)
    register_error_handlers(app)

    @app.post("/v1/completions")
    def fails():
        raise NoWorkers("no live decode worker")

    reply = app.test_client().post("/v1/completions", json={})
    assert reply.status_code == 503 and reply.headers["Retry-After"].isdigit()
    assert reply.get_json()["error"]["type"] == "service_unavailable"
