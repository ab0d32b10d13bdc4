//! The lost-slot guard under the documented least-privilege setup: the migrations applied by
//! a superuser, the relay connecting as their `outbox_relay` role, which owns nothing. The
//! relay records the slot it creates in `public.outbox_relay_slots` (no warning), refuses to
//! start once that slot is gone (as after a failover to a server without it) and creates no
//! slot, and starts with a fresh slot once the record is deleted as its recovery says.
//! Judged by what an operator sees: the record's row, `pg_replication_slots`, the last stderr
//! line, and the lines of `check` and `status`.

mod common;

use std::time::Duration;

use common::{basic_config, cli, Broker, Pg, Relay, SLOT};

const STARTUP: Duration = Duration::from_secs(30);
const MARKER_TABLE: &str = "public.outbox_relay_slots";

/// PostgreSQL with both migrations applied by its superuser, as the README says.
async fn migrated() -> Pg {
    let pg = Pg::start();
    let root = env!("CARGO_MANIFEST_DIR");
    for file in ["migrations/001_outbox.sql", "migrations/002_relay_role.sql"] {
        let sql = std::fs::read_to_string(format!("{root}/{file}")).expect("read migration");
        pg.sql(&sql).await;
    }
    pg
}

/// The relay's config as the migrations' role (trust authentication on loopback).
fn relay_config(pg: &Pg, broker: &Broker) -> String {
    let url = format!("postgres://outbox_relay@127.0.0.1:{}/postgres", pg.port());
    basic_config(&url, &broker.bootstrap())
}

/// The recorded creation LSN of `slot`, if there is a record.
async fn recorded(pg: &Pg, slot: &str) -> Option<String> {
    pg.client()
        .await
        .query_opt(
            &format!("SELECT created_lsn::text FROM {MARKER_TABLE} WHERE slot_name = $1"),
            &[&slot],
        )
        .await
        .expect("read the slot record")
        .map(|row| row.get(0))
}

async fn stop(relay: &mut Relay) {
    relay.sigterm();
    let status = relay.wait_exit(Duration::from_secs(20)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "the relay did not stop cleanly ({status:?}):\n{}",
        relay.stderr()
    );
}

/// Warnings that would mean the guard is not armed (the old one included).
fn assert_no_guard_warning(stderr: &str, what: &str) {
    for needle in ["cannot mark publication", "lost-slot guard is off"] {
        assert!(
            !stderr.contains(needle),
            "{what}: the relay warns {needle:?}:\n{stderr}"
        );
    }
}

#[tokio::test]
async fn a_slot_lost_under_the_least_privilege_role_is_refused_until_its_record_is_deleted() {
    let pg = migrated().await;
    let broker = Broker::start();
    let config = relay_config(&pg, &broker);

    let out = cli(&["check"], &config).await;
    assert!(
        out.has_line("ok    ", "lost-slot guard armed")
            && out.has_line("ok    ", MARKER_TABLE)
            && out.with_label("WARN").iter().all(|l| !l.contains("guard")),
        "check does not say the guard is armed:\n{}",
        out.show()
    );

    let mut relay = Relay::start(&config);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
    // The row is written right after the slot; give it the start-up's time.
    let deadline = std::time::Instant::now() + STARTUP;
    let lsn = loop {
        if let Some(lsn) = recorded(&pg, SLOT).await {
            break lsn;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no record of slot {SLOT} in {MARKER_TABLE}:\n{}",
            relay.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    stop(&mut relay).await;
    assert_no_guard_warning(&relay.stderr(), "first start");

    // The slot is lost, as after a failover to a standby without it; the record replicated.
    pg.sql(&format!("SELECT pg_drop_replication_slot('{SLOT}')"))
        .await;

    let mut relay = Relay::start(&config);
    let line = relay
        .expect_fatal_exit(Duration::from_secs(30), "slot lost")
        .await;
    for needle in [
        format!("replication slot {SLOT} is gone"),
        format!("{MARKER_TABLE} records \"slot {SLOT} created at {lsn}"),
        "may never have reached Kafka".to_owned(),
        format!("run DELETE FROM {MARKER_TABLE} WHERE slot_name = '{SLOT}'"),
    ] {
        assert!(line.contains(&needle), "{needle:?} not in {line:?}");
    }
    assert_eq!(
        pg.confirmed_flush_lsn(SLOT).await,
        None,
        "a fresh slot was created over the lost one"
    );
    // check and status judge it the same way.
    let out = cli(&["check"], &config).await;
    let fail = out.assert_one_fail(&[&format!("replication slot {SLOT} is gone")]);
    assert!(fail.contains("DELETE FROM"), "{fail}");
    let out = cli(&["status", "--json"], &config).await;
    let problem = out.json()["problem"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(problem.contains("is gone"), "status: {}", out.show());

    // The recovery the line gives, done by the table's owner: a fresh slot and a new record.
    pg.sql(&format!(
        "DELETE FROM {MARKER_TABLE} WHERE slot_name = '{SLOT}'"
    ))
    .await;
    let mut relay = Relay::start(&config);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
    assert!(
        common::wait_until(STARTUP, || async { recorded(&pg, SLOT).await.is_some() }).await,
        "the fresh slot was not recorded"
    );
    stop(&mut relay).await;
    assert_no_guard_warning(&relay.stderr(), "after the recovery");
}

#[tokio::test]
async fn without_the_record_table_the_guard_is_off_and_says_how_to_arm_it() {
    let pg = migrated().await;
    // A setup from before the table existed: the role neither may write a record nor owns
    // the publication.
    pg.sql(&format!("DROP TABLE {MARKER_TABLE}")).await;
    let broker = Broker::start();
    let config = relay_config(&pg, &broker);

    let out = cli(&["check"], &config).await;
    let warns = out.with_label("WARN");
    assert!(
        warns
            .iter()
            .any(|l| l.contains("the lost-slot guard is off")
                && l.contains("does not own publication outbox_relay")
                && l.contains("run migrations/002_relay_role.sql")),
        "check does not warn that the guard is off:\n{}",
        out.show()
    );
    assert!(out.fails().is_empty(), "{}", out.show());

    let mut relay = Relay::start(&config);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
    stop(&mut relay).await;
    let stderr = relay.stderr();
    assert!(
        stderr.contains("the lost-slot guard is off") && stderr.contains("002_relay_role.sql"),
        "the relay does not warn that the guard is off:\n{stderr}"
    );
}

#[tokio::test]
async fn a_role_without_usage_on_the_tables_schema_has_the_guard_off_not_a_failure() {
    let pg = migrated().await;
    // A hardened server: nobody but the owner may use schema public; this relay's outbox
    // lives elsewhere, so it needs nothing there.
    pg.sql(
        "REVOKE USAGE ON SCHEMA public FROM PUBLIC, outbox_relay; \
         CREATE SCHEMA billing; GRANT USAGE ON SCHEMA billing TO outbox_relay; \
         CREATE TABLE billing.outbox (LIKE public.outbox INCLUDING ALL); \
         GRANT SELECT ON billing.outbox TO outbox_relay; \
         CREATE PUBLICATION billing_outbox FOR TABLE billing.outbox \
           WITH (publish = 'insert', publish_via_partition_root = true)",
    )
    .await;
    let broker = Broker::start();
    let url = format!("postgres://outbox_relay@127.0.0.1:{}/postgres", pg.port());
    let config = format!(
        "[postgres]\nurl = \"{url}\"\npublication = \"billing_outbox\"\n\n\
         [[outbox]]\ntable = \"billing.outbox\"\n\n[kafka]\nbrokers = \"{}\"\n",
        broker.bootstrap()
    );
    let out = cli(&["check"], &config).await;
    assert!(out.fails().is_empty(), "{}", out.show());
    assert!(
        out.with_label("WARN").iter().any(|l| l.contains(
            "role outbox_relay cannot write public.outbox_relay_slots (no SELECT privilege on it, or no USAGE on its schema)"
        )),
        "{}",
        out.show()
    );
}
