//! `outbox-relay check` and `outbox-relay status` against a real PostgreSQL 15 and Apache
//! Kafka: a good setup passes every check; each bad setup fails with
//! exactly one `FAIL` line naming its cause; `status --json` tracks the slot the relay uses.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{
    basic_config, cli, free_port, insert_outbox, run_cli, wait_until, Broker, Out, Pg, Relay, Seqs,
    OUTBOX_DDL, PARTITIONED_OUTBOX_DDL, SLOT,
};

/// Generous: the machine is small and shared; this bounds waiting, it measures nothing.
const STARTUP: Duration = Duration::from_secs(60);
const TOPIC: &str = "outbox.event.order";

async fn check(config: &str) -> Out {
    cli(&["check"], config).await
}

async fn status(config: &str, json: bool) -> Out {
    let args: &[&str] = if json {
        &["status", "--json"]
    } else {
        &["status"]
    };
    cli(args, config).await
}

/// PostgreSQL with the default outbox table, and a broker with its topic.
async fn good_setup() -> (Pg, Broker) {
    let pg = Pg::start();
    let broker = Broker::start();
    pg.sql(OUTBOX_DDL).await;
    broker.create_topic(TOPIC, 1).await;
    (pg, broker)
}

async fn has_publication(pg: &Pg) -> bool {
    pg.client()
        .await
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = 'outbox_relay'",
            &[],
        )
        .await
        .expect("query pg_publication")
        .is_some()
}

// ---------------------------------------------------------------------------------------------
// check: good setups
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn check_passes_on_a_good_setup_before_and_after_the_relay_ran() {
    let (pg, broker) = good_setup().await;
    let config = basic_config(&pg.url(), &broker.bootstrap());

    let out = check(&config).await;
    out.assert_all_ok();
    for (needle, why) in [
        ("wal_level = logical", "wal_level"),
        ("role postgres may replicate", "replication privilege"),
        ("replication connection opens", "replication connection"),
        ("outbox table public.outbox has columns", "table"),
        ("may SELECT from public.outbox", "SELECT privilege"),
        (
            "publication outbox_relay does not exist; the relay will create it",
            "publication",
        ),
        (
            "replication slot outbox_relay does not exist; the relay will create it",
            "slot",
        ),
        ("Kafka reachable at", "broker"),
    ] {
        assert!(
            out.has_line("ok    ", needle),
            "no ok line for the {why}:\n{}",
            out.show()
        );
    }
    assert!(
        out.has_line("info  ", TOPIC),
        "the template's existing topics should be listed:\n{}",
        out.show()
    );
    // Read-only: nothing was created.
    assert!(!has_publication(&pg).await, "check created the publication");
    assert_eq!(
        pg.confirmed_flush_lsn(SLOT).await,
        None,
        "check created the slot"
    );

    let mut relay = Relay::start(&config);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
    let out = check(&config).await;
    out.assert_all_ok();
    assert!(
        out.has_line(
            "ok    ",
            "publication outbox_relay publishes inserts of public.outbox"
        ),
        "{}",
        out.show()
    );
    assert!(
        out.has_line(
            "ok    ",
            "replication slot outbox_relay: pgoutput in database postgres"
        ),
        "{}",
        out.show()
    );
    relay.assert_running();
}

#[tokio::test]
async fn check_passes_with_only_a_table_less_outbox() {
    let pg = Pg::start();
    let broker = Broker::start();
    let config = format!(
        "[postgres]\nurl = \"{}\"\n\n[[message]]\nprefix = \"outbox\"\n\n[kafka]\nbrokers = \"{}\"\n",
        pg.url(),
        broker.bootstrap()
    );
    let out = check(&config).await;
    out.assert_all_ok();
    assert!(
        out.stdout
            .contains("sends logical decoding messages for [[message]] prefixes"),
        "{}",
        out.show()
    );
}

#[tokio::test]
async fn check_passes_for_the_least_privilege_role_of_the_migrations() {
    let (pg, broker) = good_setup().await;
    // The documented setup: the owner runs the migrations; the relay's role owns nothing.
    let root = env!("CARGO_MANIFEST_DIR");
    pg.sql("DROP TABLE public.outbox").await;
    for file in ["migrations/001_outbox.sql", "migrations/002_relay_role.sql"] {
        let sql = std::fs::read_to_string(format!("{root}/{file}")).expect("read migration");
        pg.sql(&sql).await;
    }
    let url = format!("postgres://outbox_relay@127.0.0.1:{}/postgres", pg.port());
    let out = check(&basic_config(&url, &broker.bootstrap())).await;
    out.assert_all_ok();
    assert!(
        out.has_line("ok    ", "role outbox_relay has REPLICATION"),
        "{}",
        out.show()
    );
}

#[tokio::test]
async fn check_requires_fixed_topics_to_exist() {
    let (pg, broker) = good_setup().await;
    pg.sql("CREATE TABLE public.outbox2 (LIKE public.outbox INCLUDING ALL)")
        .await;
    broker.create_topic("orders", 3).await;
    let config = format!(
        "[postgres]\nurl = \"{}\"\n\n\
         [[outbox]]\ntable = \"public.outbox\"\ntopic = \"orders\"\n\n\
         [[outbox]]\ntable = \"public.outbox2\"\ntopic = \"no-such-topic\"\n\n\
         [kafka]\nbrokers = \"{}\"\n",
        pg.url(),
        broker.bootstrap()
    );
    let out = check(&config).await;
    out.assert_one_fail(&["topic no-such-topic", "does not exist", "public.outbox2"]);
    assert!(
        out.has_line("ok    ", "topic orders exists (3 partition(s))"),
        "{}",
        out.show()
    );
    // Asking the broker about the missing topic must not have created it.
    let out = check(&config).await;
    out.assert_one_fail(&["topic no-such-topic"]);
}

#[tokio::test]
async fn check_requires_a_message_prefix_fixed_topic_to_exist() {
    let (pg, broker) = good_setup().await;
    broker.create_topic("orders", 3).await;
    let config = format!(
        "[postgres]\nurl = \"{}\"\n\n\
         [[outbox]]\ntable = \"public.outbox\"\ntopic = \"orders\"\n\n\
         [[message]]\nprefix = \"billing\"\ntopic = \"no-such-billing-topic\"\n\n\
         [kafka]\nbrokers = \"{}\"\n",
        pg.url(),
        broker.bootstrap()
    );
    let out = check(&config).await;
    out.assert_one_fail(&[
        "topic no-such-billing-topic",
        "does not exist",
        "[[message]] prefix \"billing\"",
    ]);
}

// ---------------------------------------------------------------------------------------------
// check: bad setups, one FAIL line each
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn check_fails_when_wal_level_is_replica() {
    let (pg, broker) = good_setup().await;
    pg.restart_with("wal_level = replica");
    let out = check(&basic_config(&pg.url(), &broker.bootstrap())).await;
    out.assert_one_fail(&["wal_level is \"replica\"", "wal_level = logical", "restart"]);
}

#[tokio::test]
async fn check_fails_when_the_table_is_missing() {
    let pg = Pg::start();
    let broker = Broker::start();
    let out = check(&basic_config(&pg.url(), &broker.bootstrap())).await;
    out.assert_one_fail(&["outbox table public.outbox does not exist", "create it"]);
}

#[tokio::test]
async fn check_fails_when_a_column_is_missing() {
    let pg = Pg::start();
    let broker = Broker::start();
    pg.sql(
        "CREATE TABLE public.outbox (id uuid PRIMARY KEY, aggregatetype text, \
         aggregateid text, type text)",
    )
    .await;
    let out = check(&basic_config(&pg.url(), &broker.bootstrap())).await;
    out.assert_one_fail(&["public.outbox", "no column \"payload\"", "payload_column"]);
}

#[tokio::test]
async fn check_fails_on_an_unknown_config_key() {
    let config = basic_config("postgres://postgres@127.0.0.1:1/postgres", "127.0.0.1:1")
        .replace("url =", "urll =");
    let out = check(&config).await;
    out.assert_one_fail(&["urll"]);
}

#[tokio::test]
async fn check_fails_on_malformed_toml_naming_the_line() {
    let config = "# relay\n[postgres\nurl = \"postgres://x@127.0.0.1/db\"\n";
    let out = check(config).await;
    out.assert_one_fail(&["line 2"]);
}

#[tokio::test]
async fn check_fails_on_a_wrong_password() {
    let (pg, broker) = good_setup().await;
    pg.create_scram_role("relay", "right-password").await;
    let url = pg.url_for("relay", "wrong-password");
    let out = check(&basic_config(&url, &broker.bootstrap())).await;
    let line = out.assert_one_fail(&[
        "password authentication failed",
        &format!("127.0.0.1:{}", pg.port()),
    ]);
    assert!(
        !line.contains("wrong-password"),
        "the password leaked: {line}"
    );
    // The broker is still checked without a database connection.
    assert!(out.has_line("ok    ", "Kafka reachable"), "{}", out.show());
}

#[tokio::test]
async fn check_fails_when_the_publication_misses_the_table() {
    let (pg, broker) = good_setup().await;
    pg.sql(
        "CREATE TABLE public.other (id int PRIMARY KEY);
         CREATE PUBLICATION outbox_relay FOR TABLE public.other WITH (publish = 'insert')",
    )
    .await;
    let out = check(&basic_config(&pg.url(), &broker.bootstrap())).await;
    out.assert_one_fail(&[
        "publication outbox_relay does not cover table public.outbox",
        "ALTER PUBLICATION outbox_relay ADD TABLE public.outbox",
    ]);
}

#[tokio::test]
async fn check_and_status_fail_on_a_slot_with_the_wrong_plugin() {
    let (pg, broker) = good_setup().await;
    pg.sql("SELECT pg_create_logical_replication_slot('outbox_relay', 'test_decoding')")
        .await;
    let config = basic_config(&pg.url(), &broker.bootstrap());
    let out = check(&config).await;
    out.assert_one_fail(&[
        "replication slot outbox_relay",
        "plugin test_decoding",
        "pg_drop_replication_slot",
    ]);

    let out = status(&config, true).await;
    out.assert_no_panic();
    assert_eq!(out.code, Some(1), "{}", out.show());
    let json = out.json();
    assert_eq!(json["exists"], true);
    assert_eq!(json["plugin"], "test_decoding");
    assert_eq!(json["ok"], false);
}

#[tokio::test]
async fn check_fails_when_the_broker_is_unreachable() {
    let pg = Pg::start();
    pg.sql(OUTBOX_DDL).await;
    let closed = format!("127.0.0.1:{}", free_port());
    // Keep the metadata wait short: nothing listens there.
    let config = basic_config(&pg.url(), &closed)
        + "\n[kafka.properties]\n\"socket.timeout.ms\" = \"2000\"\n\"reconnect.backoff.max.ms\" = \"200\"\n";
    let out = check(&config).await;
    let line = out.assert_one_fail(&[
        &format!("Kafka at {closed} is unreachable"),
        "[kafka] brokers",
        // The reason, as the client saw it, rather than an unrelated configuration warning.
        "Connection refused",
    ]);
    assert!(
        !line.contains("CONFWARN") && !line.contains("experimental"),
        "a configuration warning stands in for the transport error: {line}"
    );
    // The database checks ran all the same.
    assert!(
        out.has_line("ok    ", "wal_level = logical"),
        "{}",
        out.show()
    );
}

/// With librdkafka's default reconnect timing and nothing to wait for on the database side,
/// the configuration warnings of client creation (CONFWARN: the relay's own
/// enable.gapless.guarantee is "experimental") come after the first refused connection: the
/// reason shown must still be the refused connection.
#[tokio::test]
async fn check_names_the_broker_transport_error_not_a_configuration_warning() {
    let closed = format!("127.0.0.1:{}", free_port());
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", free_port());
    let config =
        basic_config(&url, &closed) + "\n[kafka.properties]\n\"socket.timeout.ms\" = \"2000\"\n";
    let out = check(&config).await;
    out.assert_no_panic();
    let kafka: Vec<&str> = out
        .with_label("FAIL")
        .into_iter()
        .filter(|l| l.contains(&format!("Kafka at {closed} is unreachable")))
        .collect();
    assert_eq!(kafka.len(), 1, "{}", out.show());
    assert!(
        kafka[0].contains("Connection refused") && !kafka[0].contains("CONFWARN"),
        "the Kafka line should give the refused connection as the reason: {}",
        kafka[0]
    );
}

#[tokio::test]
async fn check_fails_for_a_role_without_replication() {
    let (pg, broker) = good_setup().await;
    pg.sql(
        "CREATE ROLE norep LOGIN;
         GRANT SELECT ON public.outbox TO norep;
         CREATE PUBLICATION outbox_relay FOR TABLE public.outbox WITH (publish = 'insert')",
    )
    .await;
    let url = format!("postgres://norep@127.0.0.1:{}/postgres", pg.port());
    let out = check(&basic_config(&url, &broker.bootstrap())).await;
    out.assert_one_fail(&[
        "role norep lacks the REPLICATION attribute",
        "ALTER ROLE norep REPLICATION",
    ]);
}

// ---------------------------------------------------------------------------------------------
// Errors without a setup: one line, an exit code, never a panic
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn missing_config_file_and_unreachable_database_are_one_line_errors() {
    let missing = PathBuf::from("/nonexistent/outbox-relay/relay.toml");
    let out = run_cli(&["check"], &missing).await;
    out.assert_one_fail(&["cannot read config file", "relay.toml"]);

    for json in [false, true] {
        let args: &[&str] = if json {
            &["status", "--json"]
        } else {
            &["status"]
        };
        let out = run_cli(args, &missing).await;
        out.assert_no_panic();
        assert_eq!(out.code, Some(2), "{}", out.show());
        assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.show());
        assert!(
            out.stderr.contains("cannot read config file"),
            "{}",
            out.show()
        );
    }

    // Nothing listens on either port.
    let pg_port = free_port();
    let url = format!("postgres://postgres:secret@127.0.0.1:{pg_port}/postgres");
    let config = basic_config(&url, &format!("127.0.0.1:{}", free_port()))
        + "\n[kafka.properties]\n\"socket.timeout.ms\" = \"1000\"\n";
    let out = check(&config).await;
    out.assert_no_panic();
    assert_ne!(out.code, Some(0), "{}", out.show());
    assert!(
        out.has_line(
            "FAIL  ",
            &format!("cannot connect to PostgreSQL at postgres@127.0.0.1:{pg_port}/postgres")
        ),
        "{}",
        out.show()
    );
    assert!(
        !out.stdout.contains("secret"),
        "the password leaked:\n{}",
        out.show()
    );

    let out = status(&config, true).await;
    out.assert_no_panic();
    assert_eq!(out.code, Some(2), "{}", out.show());
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.show());
    assert!(
        out.stderr.contains(&format!("127.0.0.1:{pg_port}")),
        "{}",
        out.show()
    );
    assert!(
        !out.stderr.contains("secret"),
        "the password leaked:\n{}",
        out.show()
    );
}

// ---------------------------------------------------------------------------------------------
// status
// ---------------------------------------------------------------------------------------------

fn lsn(v: &serde_json::Value, field: &str) -> u64 {
    let text = v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} should be an X/Y string: {v}"));
    let (hi, lo) = text
        .split_once('/')
        .unwrap_or_else(|| panic!("{field} = {text:?} is not X/Y"));
    (u64::from_str_radix(hi, 16).expect("hex") << 32) | u64::from_str_radix(lo, 16).expect("hex")
}

#[tokio::test]
async fn status_json_before_and_after_the_relay_ran() {
    let (pg, broker) = good_setup().await;
    let config = basic_config(&pg.url(), &broker.bootstrap());

    // Before: no slot, no publication; exit 1 but everything known is printed.
    let out = status(&config, true).await;
    out.assert_no_panic();
    assert_eq!(out.code, Some(1), "{}", out.show());
    let before = out.json();
    for field in [
        "slot",
        "exists",
        "active",
        "active_pid",
        "plugin",
        "wal_status",
        "confirmed_flush_lsn",
        "restart_lsn",
        "current_wal_lsn",
        "lag_bytes",
        "publication",
        "publication_tables",
        "ok",
    ] {
        assert!(
            before.get(field).is_some(),
            "field {field} missing: {before}"
        );
    }
    assert_eq!(before["slot"], SLOT);
    assert_eq!(before["exists"], false);
    assert_eq!(before["active"], false);
    assert!(before["lag_bytes"].is_null() && before["confirmed_flush_lsn"].is_null());
    assert_eq!(before["publication_exists"], false);
    assert!(before["current_wal_lsn"].is_string(), "{before}");
    let text = status(&config, false).await;
    assert_eq!(text.code, Some(1), "{}", text.show());
    assert!(
        text.stdout
            .lines()
            .any(|l| l.starts_with("exists") && l.ends_with("no")),
        "{}",
        text.show()
    );

    // After the relay created the slot and relayed some events.
    let mut relay = Relay::start(&config);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
    let client = pg.client().await;
    let mut seqs = Seqs::default();
    let events: Vec<_> = (0..5)
        .map(|_| seqs.event("order", "order-1", "Created", "s"))
        .collect();
    insert_outbox(&client, &events).await;
    let target = pg.current_wal_lsn().await;
    let (reached, last) = pg
        .wait_confirmed(SLOT, target, Duration::from_secs(60))
        .await;
    assert!(
        reached,
        "slot confirmed {last:?}, wanted {target}; stderr:\n{}",
        relay.stderr()
    );

    let out = status(&config, true).await;
    out.assert_no_panic();
    assert_eq!(out.code, Some(0), "{}", out.show());
    let after = out.json();
    assert_eq!(after["exists"], true);
    assert_eq!(after["active"], true);
    assert!(
        after["active_pid"].as_i64().is_some_and(|p| p > 0),
        "{after}"
    );
    assert_eq!(after["plugin"], "pgoutput");
    assert_eq!(after["slot_type"], "logical");
    assert_eq!(after["database"], "postgres");
    assert!(
        matches!(after["wal_status"].as_str(), Some("reserved" | "extended")),
        "{after}"
    );
    assert_eq!(after["ok"], true);
    assert!(after["problem"].is_null(), "{after}");
    assert_eq!(after["publication_exists"], true);
    assert_eq!(
        after["publication_tables"],
        serde_json::json!(["public.outbox"])
    );
    let confirmed = lsn(&after, "confirmed_flush_lsn");
    let restart = lsn(&after, "restart_lsn");
    let current = lsn(&after, "current_wal_lsn");
    assert!(
        confirmed >= target,
        "confirmed {confirmed} < {target}: {after}"
    );
    assert!(restart <= confirmed && confirmed <= current, "{after}");
    assert_eq!(
        after["lag_bytes"].as_i64(),
        Some((current - confirmed) as i64),
        "{after}"
    );
    assert_eq!(
        after["retained_bytes"].as_i64(),
        Some((current - restart) as i64),
        "{after}"
    );

    // The relay gone: the slot stays, inactive, and still usable.
    relay.kill9();
    let inactive = wait_until(Duration::from_secs(30), || async {
        !pg.slot_active(SLOT).await
    })
    .await;
    assert!(
        inactive,
        "the slot stayed active after the relay was killed"
    );
    let out = status(&config, true).await;
    assert_eq!(out.code, Some(0), "{}", out.show());
    let gone = out.json();
    assert_eq!(gone["active"], false);
    assert!(gone["active_pid"].is_null(), "{gone}");
    assert!(lsn(&gone, "confirmed_flush_lsn") >= confirmed, "{gone}");

    let text = status(&config, false).await;
    assert_eq!(text.code, Some(0), "{}", text.show());
    for name in [
        "confirmed_flush_lsn",
        "restart_lsn",
        "lag_bytes",
        "wal_status",
        "publication_tables",
    ] {
        assert!(
            text.stdout.lines().any(|l| l.starts_with(name)),
            "text output should have a {name} line:\n{}",
            text.show()
        );
    }
    for (name, value) in [("exists", "yes"), ("active", "no"), ("plugin", "pgoutput")] {
        assert!(
            text.stdout
                .lines()
                .any(|l| l.starts_with(name) && l.split_whitespace().nth(1) == Some(value)),
            "text output should show {name} {value}:\n{}",
            text.show()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// check and run share the publication rules
// ---------------------------------------------------------------------------------------------

/// A partitioned outbox in a publication made without `publish_via_partition_root`: its rows
/// would arrive under the partitions' names. `run` refuses to start; `check` must say the same
/// (it used to pass, so check said OK and run then refused).
#[tokio::test]
async fn check_and_run_refuse_a_partitioned_outbox_published_via_its_partitions_alike() {
    let pg = Pg::start();
    let broker = Broker::start();
    pg.sql(PARTITIONED_OUTBOX_DDL).await;
    pg.sql("CREATE PUBLICATION outbox_relay FOR TABLE public.outbox WITH (publish = 'insert')")
        .await;
    broker.create_topic(TOPIC, 1).await;
    let config = basic_config(&pg.url(), &broker.bootstrap());
    let rule = "publish_via_partition_root = true";

    let out = check(&config).await;
    assert_ne!(out.code, Some(0), "check passed:\n{}", out.show());
    let failing: Vec<&str> = out
        .stdout
        .lines()
        .chain(out.stderr.lines())
        .filter(|l| l.contains(rule))
        .collect();
    assert!(
        !failing.is_empty(),
        "check did not name the rule:\n{}",
        out.show()
    );

    let mut relay = Relay::start(&config);
    let exited = relay.wait_exit(Duration::from_secs(30)).await;
    let stderr = relay.stderr();
    assert!(
        exited.is_some_and(|s| !s.success()),
        "run did not refuse to start ({exited:?}):\n{stderr}"
    );
    let last = common::last_line(&stderr);
    assert!(
        failing
            .iter()
            .any(|l| l.contains("publishes the partitions of table")
                && last.contains("publishes the partitions of table")),
        "check and run give different reasons:\ncheck: {failing:?}\nrun:   {last}"
    );
}
