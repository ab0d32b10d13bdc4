//! TLS towards PostgreSQL (both the SQL and the replication connection, every sslmode,
//! SCRAM-SHA-256-PLUS channel binding) and towards Kafka (TLS and SASL through
//! `[kafka.properties]`), on real servers with certificates made by the test.
//!
//! The Kafka side runs on Apache Kafka's own SSL and SASL_SSL (SCRAM-SHA-512) listeners.

mod common;

use std::time::Duration;

use common::{
    basic_config, check_delivery, insert_outbox, settle, Broker, Event, Patience, Pg, Relay, Seqs,
    TestPki, OUTBOX_DDL, SLOT,
};
use outbox_relay::config::Config;
use outbox_relay::postgres::connect::{tls_config_error, OpenError, PgEndpoint, SslMode};
use outbox_relay::postgres::replication::{ReplicationConnection, ReplicationError};

const PARTITIONS: i32 = 3;
const TOPIC: &str = "outbox.event.order";
const ROLE: &str = "tls_relay";
const PASSWORD: &str = "Tls-Pass-42";

/// Generous bounds: the machine is small and shared; these are not performance limits.
const STARTUP: Duration = Duration::from_secs(60);
const PATIENCE: Patience = Patience {
    delivery: Duration::from_secs(120),
    confirm: Duration::from_secs(10),
};
/// How long a misconfigured relay may take to give up.
const EXIT: Duration = Duration::from_secs(30);

/// pg_hba.conf lines: the relay's role must come over TLS and prove its password with SCRAM
/// (a `replication=database` connection matches the `all` database lines).
const TLS_ONLY: &[&str] = &[
    "hostssl all tls_relay 127.0.0.1/32 scram-sha-256",
    "hostnossl all tls_relay 127.0.0.1/32 reject",
];

/// A server with TLS on, the outbox table owned by a SCRAM role that may only use TLS.
async fn tls_pg(pki: &TestPki) -> Pg {
    let pg = Pg::start();
    pg.sql(OUTBOX_DDL).await;
    pg.sql(&format!(
        "SET password_encryption = 'scram-sha-256';
         CREATE ROLE {ROLE} LOGIN REPLICATION PASSWORD '{PASSWORD}';
         ALTER TABLE public.outbox OWNER TO {ROLE};
         GRANT CREATE ON DATABASE postgres TO {ROLE};"
    ))
    .await;
    pg.enable_tls(pki, TLS_ONLY).await;
    pg
}

/// A URL for the TLS role at `host` with extra query parameters.
fn url(pg: &Pg, host: &str, query: &str) -> String {
    format!(
        "postgres://{ROLE}:{PASSWORD}@{host}:{}/postgres?{query}",
        pg.port()
    )
}

fn endpoint(url: &str) -> PgEndpoint {
    let toml = basic_config(url, "127.0.0.1:9");
    let config = Config::parse(&toml, "test.toml", |_| None).expect("test config parses");
    PgEndpoint::new(&config.postgres).expect("endpoint")
}

/// What a connection attempt showed: `Ok(ssl)` from `pg_stat_ssl`, or the error and whether
/// the relay would treat it as a configuration problem (no retry).
type Outcome = Result<bool, (String, bool)>;

/// Opens a SQL connection the way the relay does and asks the server whether it is TLS.
async fn sql_outcome(endpoint: &PgEndpoint) -> Outcome {
    let client = match endpoint.connect_sql().await {
        Ok(c) => c,
        Err(e) => {
            return Err(match tls_config_error(&e) {
                Some(message) => (message, true),
                // tokio-postgres' Display hides the server's words.
                None => (
                    e.as_db_error()
                        .map_or_else(|| e.to_string(), |db| db.message().to_owned()),
                    false,
                ),
            });
        }
    };
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| (e.to_string(), false))?;
    Ok(row.get(0))
}

/// Opens a replication connection the way the relay does and asks whether it is TLS.
async fn replication_outcome(endpoint: &PgEndpoint) -> Outcome {
    let mut conn = ReplicationConnection::connect(endpoint)
        .await
        .map_err(|e| (e.to_string(), matches!(e, ReplicationError::Config(_))))?;
    // replication=database connections run SQL too.
    let rows = conn
        .simple_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .await
        .map_err(|e| (e.to_string(), false))?;
    Ok(rows
        .first()
        .and_then(|r| r.first())
        .cloned()
        .flatten()
        .as_deref()
        == Some("t"))
}

/// Both connections must be TLS.
async fn assert_tls(what: &str, url: &str) {
    let ep = endpoint(url);
    assert_eq!(sql_outcome(&ep).await, Ok(true), "{what}: SQL connection");
    assert_eq!(
        replication_outcome(&ep).await,
        Ok(true),
        "{what}: replication connection"
    );
}

/// Both connections must fail as a configuration problem, with every `wanted` in the
/// message, on one line.
async fn assert_refused(what: &str, url: &str, wanted: &[&str]) {
    let ep = endpoint(url);
    for (kind, outcome) in [
        ("SQL", sql_outcome(&ep).await),
        ("replication", replication_outcome(&ep).await),
    ] {
        let Err((message, permanent)) = outcome else {
            panic!("{what}: the {kind} connection succeeded");
        };
        for w in wanted {
            assert!(
                message.contains(w),
                "{what}: {kind} error lacks {w:?}: {message}"
            );
        }
        assert!(permanent, "{what}: {kind} error is not final: {message}");
        assert!(!message.contains('\n'), "{what}: {kind}: {message}");
        assert!(
            !message.contains(PASSWORD),
            "{what}: password leaked: {message}"
        );
    }
}

#[tokio::test]
async fn every_sslmode_behaves_as_in_libpq_on_both_connections() {
    let pki = TestPki::new(&["localhost", "127.0.0.1"]);
    let other = TestPki::new(&["localhost", "127.0.0.1"]);
    let pg = tls_pg(&pki).await;
    let ca = pki.ca_path().display().to_string();
    let other_ca = other.ca_path().display().to_string();

    // verify-full by name and by IP address, with SCRAM bound to the TLS session: with
    // channel_binding=require both clients refuse anything but SCRAM-SHA-256-PLUS.
    assert_tls(
        "verify-full, localhost",
        &url(
            &pg,
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={ca}&channel_binding=require"),
        ),
    )
    .await;
    assert_tls(
        "verify-full, 127.0.0.1",
        &url(
            &pg,
            "127.0.0.1",
            &format!("sslmode=verify-full&sslrootcert={ca}&channel_binding=require"),
        ),
    )
    .await;
    // The key=value form.
    assert_tls(
        "key=value",
        &format!(
            "host=localhost port={} user={ROLE} password={PASSWORD} dbname=postgres sslmode=verify-full sslrootcert='{ca}'",
            pg.port()
        ),
    )
    .await;
    // A name the certificate does not carry: verify-full refuses, verify-ca accepts.
    let wrong_name = |mode: &str, root: &str| {
        url(
            &pg,
            "db.invalid",
            &format!("hostaddr=127.0.0.1&sslmode={mode}&sslrootcert={root}"),
        )
    };
    assert_refused(
        "verify-full, wrong name",
        &wrong_name("verify-full", &ca),
        &[
            "server certificate for localhost, 127.0.0.1 is not valid for host db.invalid",
            "sslmode=verify-ca",
        ],
    )
    .await;
    assert_tls("verify-ca, wrong name", &wrong_name("verify-ca", &ca)).await;
    // Another CA: verify-ca refuses; so does require once sslrootcert is given (libpq).
    for mode in ["verify-ca", "require"] {
        assert_refused(
            &format!("{mode}, other CA"),
            &url(
                &pg,
                "localhost",
                &format!("sslmode={mode}&sslrootcert={other_ca}"),
            ),
            &["is not signed by a CA in sslrootcert", "set sslrootcert"],
        )
        .await;
    }
    // require without sslrootcert and prefer encrypt without checking anything.
    assert_tls("require", &url(&pg, "localhost", "sslmode=require")).await;
    assert_tls(
        "prefer (default)",
        &url(&pg, "localhost", "application_name=x"),
    )
    .await;
    // disable: no TLS, so pg_hba.conf's hostnossl line rejects the role.
    let ep = endpoint(&url(&pg, "localhost", "sslmode=disable"));
    assert_eq!(ep.ssl_mode(), SslMode::Disable);
    let sql = sql_outcome(&ep).await;
    assert!(
        matches!(&sql, Err((m, false)) if m.contains("no encryption")),
        "{sql:?}"
    );
    let repl = replication_outcome(&ep).await;
    assert!(
        matches!(&repl, Err((m, false)) if m.contains("no encryption")),
        "{repl:?}"
    );

    // channel_binding=require refuses a session SCRAM-SHA-256-PLUS did not authenticate
    // (here: trust over plain TCP) before anything else happens on it.
    let ep = endpoint(&format!(
        "{}?sslmode=disable&channel_binding=require",
        pg.url()
    ));
    let repl = replication_outcome(&ep).await;
    assert!(
        matches!(&repl, Err((m, _)) if m.contains("channel_binding=require, but the server authenticates without SCRAM")),
        "{repl:?}"
    );
    assert!(
        sql_outcome(&ep).await.is_err(),
        "tokio-postgres ignored channel_binding=require"
    );

    // A certificate signed with ECDSA-SHA384: channel binding must hash it with SHA-384, as
    // the server does, or SCRAM-SHA-256-PLUS fails.
    let p384 = TestPki::with_ca_algorithm(&["localhost"], &rcgen::PKCS_ECDSA_P384_SHA384);
    pg.enable_tls(&p384, TLS_ONLY).await;
    assert_tls(
        "SHA-384-signed certificate",
        &url(
            &pg,
            "localhost",
            &format!(
                "sslmode=verify-full&sslrootcert={}&channel_binding=require",
                p384.ca_path().display()
            ),
        ),
    )
    .await;
}

/// Waits for the relay to exit on its own; returns its last stderr line.
async fn assert_exits_with(relay: &mut Relay, wanted: &[&str]) -> String {
    let status = relay.wait_exit(EXIT).await;
    let stderr = relay.stderr();
    let Some(status) = status else {
        panic!("the relay is still running after {EXIT:?}; stderr:\n{stderr}");
    };
    assert!(!status.success(), "exit status {status}; stderr:\n{stderr}");
    let last = stderr.lines().last().unwrap_or_default().to_owned();
    for w in wanted {
        assert!(last.contains(w), "last line lacks {w:?}: {last}\n{stderr}");
    }
    assert!(!stderr.contains(PASSWORD), "password leaked:\n{stderr}");
    // What the operator sees, for the record (shown with --nocapture).
    eprintln!("relay stopped with: {last}");
    last
}

#[tokio::test]
async fn relays_end_to_end_over_verified_tls() {
    let pki = TestPki::new(&["localhost", "127.0.0.1"]);
    let pg = tls_pg(&pki).await;
    let broker = Broker::start();
    broker.create_topic(TOPIC, PARTITIONS).await;
    let pg_url = url(
        &pg,
        "localhost",
        &format!(
            "sslmode=verify-full&sslrootcert={}&channel_binding=require&application_name=outbox-relay",
            pki.ca_path().display()
        ),
    );
    let mut relay = Relay::start(&basic_config(&pg_url, &broker.bootstrap()));
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;

    let client = pg.client().await;
    let mut seqs = Seqs::default();
    let mut expected: Vec<Event> = Vec::new();
    for i in 0..12 {
        let key = format!("order-{}", i % 3);
        expected
            .extend(insert_outbox(&client, &[seqs.event("order", &key, "Placed", "tls")]).await);
    }
    let target = pg.current_wal_lsn().await;
    let (recs, confirmed) = settle(
        &pg,
        &broker,
        &mut relay,
        &[TOPIC],
        expected.len(),
        target,
        PATIENCE,
    )
    .await;
    check_delivery(&recs, &expected, PARTITIONS).assert_ok("over TLS");
    confirmed.expect("slot confirmed");

    // Every connection of the relay (the walsender and the SQL monitor) is TLS.
    let rows = client
        .query(
            "SELECT a.backend_type, s.ssl, s.version FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = 'outbox-relay'",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    let seen: Vec<(String, bool, Option<String>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert!(
        seen.iter().any(|(kind, _, _)| kind == "walsender"),
        "no walsender: {seen:?}"
    );
    assert!(seen.iter().all(|(_, ssl, _)| *ssl), "not all TLS: {seen:?}");
    assert!(!relay.stderr().contains(PASSWORD), "password leaked");
}

#[tokio::test]
async fn relay_stops_when_the_certificate_does_not_name_the_host() {
    let pki = TestPki::new(&["localhost", "127.0.0.1"]);
    let pg = tls_pg(&pki).await;
    let pg_url = url(
        &pg,
        "db.invalid",
        &format!(
            "hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={}",
            pki.ca_path().display()
        ),
    );
    // No broker is needed: the relay stops before it creates the producer.
    let mut relay = Relay::start(&basic_config(&pg_url, "127.0.0.1:9"));
    assert_exits_with(
        &mut relay,
        &[
            "server certificate for localhost, 127.0.0.1 is not valid for host db.invalid",
            "sslmode=verify-ca",
        ],
    )
    .await;
}

#[tokio::test]
async fn sslmode_require_fails_clearly_against_a_server_without_tls() {
    let pg = Pg::start();
    pg.sql(OUTBOX_DDL).await;
    let pg_url = format!("{}?sslmode=require", pg.url());
    let ep = endpoint(&pg_url);
    match ep.open_host(0).await {
        Err(OpenError::Tls(m)) => assert!(
            m.contains("does not accept TLS connections")
                && m.contains("set ssl = on on the server or use sslmode=prefer"),
            "{m}"
        ),
        Err(e) => panic!("not a configuration error: {e}"),
        Ok(_) => panic!("connected without TLS under sslmode=require"),
    }
    let sql = sql_outcome(&ep).await;
    assert!(
        matches!(&sql, Err((m, true)) if m.contains("does not accept TLS connections")),
        "{sql:?}"
    );
    // prefer falls back to plain.
    assert_eq!(
        sql_outcome(&endpoint(&format!("{}?sslmode=prefer", pg.url()))).await,
        Ok(false)
    );

    let mut relay = Relay::start(&basic_config(&pg_url, "127.0.0.1:9"));
    assert_exits_with(
        &mut relay,
        &["does not accept TLS connections", "sslmode=prefer"],
    )
    .await;
}

/// `[kafka.properties]` lines for TLS towards the broker, verifying it against `ca`.
fn kafka_tls(ca: &std::path::Path) -> String {
    format!(
        "\n[kafka.properties]\n\"security.protocol\" = \"ssl\"\n\"ssl.ca.location\" = \"{}\"\n",
        ca.display()
    )
}

/// `[kafka.properties]` lines for SASL SCRAM-SHA-512 over TLS.
fn kafka_sasl(ca: &std::path::Path, user: &str, password: &str) -> String {
    format!(
        "\n[kafka.properties]\n\"security.protocol\" = \"sasl_ssl\"\n\"ssl.ca.location\" = \"{}\"\n\
         \"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\"sasl.username\" = \"{user}\"\n\
         \"sasl.password\" = \"{password}\"\n",
        ca.display()
    )
}

/// Twelve events through a relay configured with `config` (the broker's topic exists),
/// checked as a consumer reading over PLAINTEXT sees them.
async fn relays_twelve(pg: &Pg, broker: &Broker, config: &str, what: &str) {
    let mut relay = Relay::start(config);
    relay.wait_for_slot(pg, SLOT, STARTUP).await;
    let client = pg.client().await;
    let mut seqs = Seqs::default();
    let mut expected = Vec::new();
    for i in 0..12 {
        let key = format!("order-{}", i % 4);
        expected.extend(insert_outbox(&client, &[seqs.event("order", &key, "Placed", what)]).await);
    }
    let target = pg.current_wal_lsn().await;
    let (recs, confirmed) = settle(
        pg,
        broker,
        &mut relay,
        &[TOPIC],
        expected.len(),
        target,
        PATIENCE,
    )
    .await;
    check_delivery(&recs, &expected, PARTITIONS).assert_ok(what);
    confirmed.expect("slot confirmed");
}

/// The broker's SSL listener speaks nothing but TLS, so delivery through it is delivery
/// over TLS, with the broker's certificate verified against the test CA. Both listeners are
/// reached through proxies that keep the bytes: the payloads cross the SSL one only as TLS
/// records, and the same payloads are plainly visible on the PLAINTEXT one, where the
/// harness reads them back (so the search would find them if they leaked).
#[tokio::test]
async fn relays_to_kafka_over_tls() {
    let pki = TestPki::new(&["localhost", "127.0.0.1"]);
    let pg = Pg::start();
    pg.sql(OUTBOX_DDL).await;
    let (broker, plaintext) = Broker::start_tls_on_a_tapped_wire(&pki);
    broker.create_topic(TOPIC, PARTITIONS).await;
    let config = basic_config(&pg.url(), &broker.ssl_bootstrap()) + &kafka_tls(&pki.ca_path());
    let marker = "kafka-over-tls-wire-marker";
    relays_twelve(&pg, &broker, &config, marker).await;

    let tls = broker.ssl_proxy().wire();
    let clear = plaintext.wire();
    let seen = |wire: &[u8]| wire.windows(marker.len()).any(|w| w == marker.as_bytes());
    assert!(
        tls.len() > 4096 && tls[0] == 0x16,
        "the relay's traffic did not cross the SSL listener as TLS ({} bytes)",
        tls.len()
    );
    assert!(
        !seen(&tls),
        "a payload crossed the SSL listener in clear text"
    );
    assert!(
        seen(&clear),
        "the control failed: payloads not found on the PLAINTEXT wire"
    );
}

/// `[metrics] listen` on a free port, to ask `/readyz` why the relay is not ready.
fn with_http(config: String) -> (String, u16) {
    let port = common::free_port();
    (
        format!("{config}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
        port,
    )
}

/// Polls `/readyz` until it answers 503 with a body containing `needle`; returns the body.
async fn readyz_says(port: u16, needle: &str, what: &str) -> String {
    let mut last = String::new();
    let said = common::wait_until(EXIT, || {
        let answer = common::http_get(port, "/readyz");
        if let Ok((_, body)) = &answer {
            last = body.clone();
        }
        async move { matches!(answer, Ok((503, body)) if body.contains(needle)) }
    })
    .await;
    assert!(
        said,
        "{what}: /readyz never answered 503 naming {needle:?}; last: {last:?}"
    );
    eprintln!("{what}: /readyz 503 {}", last.trim());
    last
}

/// A broker certificate from another CA, or one naming another host: the relay keeps its
/// slot and says why on `/readyz`, in librdkafka's words (which name `ssl.ca.location`).
#[tokio::test]
async fn kafka_tls_refuses_a_wrong_ca_or_host_name_and_says_why() {
    let pki = TestPki::new(&["localhost", "127.0.0.1"]);
    let other = TestPki::new(&["localhost", "127.0.0.1"]);
    let elsewhere = TestPki::new(&["kafka.elsewhere.test"]);
    for (what, server, trusted) in [
        ("a certificate from another CA", &pki, &other),
        ("a certificate naming another host", &elsewhere, &elsewhere),
    ] {
        let pg = Pg::start();
        pg.sql(OUTBOX_DDL).await;
        let broker = Broker::start_tls(server, &[]);
        broker.create_topic(TOPIC, PARTITIONS).await;
        let (config, port) = with_http(
            basic_config(&pg.url(), &broker.ssl_bootstrap()) + &kafka_tls(&trusted.ca_path()),
        );
        let mut relay = Relay::start(&config);
        readyz_says(port, "certificate verify failed", what).await;
        relay.assert_running();
        let client = pg.client().await;
        insert_outbox(
            &client,
            &[Seqs::default().event("order", "order-1", "Placed", "x")],
        )
        .await;
        let recs = broker.read_all(&[TOPIC], 1, Duration::from_secs(5)).await;
        assert!(
            recs.is_empty(),
            "{what}: records reached an unverified broker: {recs:?}"
        );
    }
}

/// SASL SCRAM-SHA-512 over TLS through `[kafka.properties]`, as on MSK or Confluent: a wrong
/// password is reported without the password and delivers nothing; the right one delivers.
#[tokio::test]
async fn kafka_sasl_scram_512_over_tls_from_kafka_properties() {
    let pki = TestPki::new(&["localhost", "127.0.0.1"]);
    let pg = Pg::start();
    pg.sql(OUTBOX_DDL).await;
    let secret = "Kafka-Secret-7";
    let broker = Broker::start_tls(&pki, &[("relay", secret)]);
    broker.create_topic(TOPIC, PARTITIONS).await;

    let wrong = "Not-The-Secret-9";
    let (config, port) = with_http(
        basic_config(&pg.url(), &broker.sasl_bootstrap())
            + &kafka_sasl(&pki.ca_path(), "relay", wrong),
    );
    let mut relay = Relay::start(&config);
    let ready = readyz_says(port, "SASL authentication error", "a wrong password").await;
    let metrics = common::http_get(port, "/metrics").map_or_else(|e| e.to_string(), |(_, b)| b);
    let check = common::cli(&["check"], &config).await;
    relay.kill9();
    let stderr = relay.stderr();
    for (place, text) in [
        ("stderr", &stderr),
        ("/readyz", &ready),
        ("/metrics", &metrics),
        ("check", &format!("{}{}", check.stdout, check.stderr)),
    ] {
        assert!(
            !text.contains(wrong),
            "the SASL password leaked in {place}:\n{text}"
        );
    }
    let fail = check.assert_one_fail(&[]);
    eprintln!("check reported: {fail}");

    let config = basic_config(&pg.url(), &broker.sasl_bootstrap())
        + &kafka_sasl(&pki.ca_path(), "relay", secret);
    relays_twelve(&pg, &broker, &config, "SCRAM-SHA-512 over TLS").await;
}

#[test]
fn librdkafka_has_tls_and_every_sasl_mechanism_but_gssapi() {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::BaseProducer;
    // librdkafka refuses these settings at creation when built without OpenSSL.
    for (protocol, mechanism) in [
        ("ssl", None),
        ("sasl_ssl", Some("PLAIN")),
        ("sasl_ssl", Some("SCRAM-SHA-256")),
        ("sasl_ssl", Some("SCRAM-SHA-512")),
        ("sasl_plaintext", Some("SCRAM-SHA-512")),
    ] {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", "127.0.0.1:9")
            .set("security.protocol", protocol)
            .set("sasl.username", "u")
            .set("sasl.password", "p");
        if let Some(m) = mechanism {
            config.set("sasl.mechanism", m);
        }
        if let Err(e) = config.create::<BaseProducer>() {
            panic!("{protocol} {mechanism:?}: {e}");
        }
    }
}
