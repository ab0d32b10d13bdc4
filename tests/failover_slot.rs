//! `[postgres] failover_slot` on PostgreSQL 17: the relay's slot is a failover slot
//! (`pg_replication_slots.failover`), whether the relay created it, the initial snapshot's copy
//! made it (PostgreSQL does not copy the property) or someone made it by hand without; `check`
//! and `status` say which, and before 17 an explicit `failover_slot = true` is one `check`
//! FAIL line naming the version. With a standby listed first in `[postgres] url`, the relay
//! streams from the primary.
//!
//! The PostgreSQL 17 tests need `OUTBOX_TEST_PG17_BIN` (scripts/test.sh sets it).

mod common;

use std::time::Duration;

use common::{basic_config, cli, free_port, wait_until, Broker, Pg, Relay, OUTBOX_DDL, SLOT};

const STARTUP: Duration = Duration::from_secs(120);

async fn slot_failover(pg: &Pg) -> Option<bool> {
    pg.client()
        .await
        .query_opt(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
            &[&SLOT],
        )
        .await
        .expect("read pg_replication_slots")
        .map(|row| row.get(0))
}

/// `basic_config` with `extra` lines in `[postgres]`.
fn config_with(pg_url: &str, bootstrap: &str, extra: &str) -> String {
    basic_config(pg_url, bootstrap).replacen(
        "\n\n[[outbox]]\n",
        &format!("\n{extra}\n\n[[outbox]]\n"),
        1,
    )
}

/// The relay runs until its slot is a failover slot, which `status --json` and `check` say.
async fn relay_keeps_a_failover_slot(pg: &Pg, extra: &str) {
    let broker = Broker::start();
    let config = config_with(&pg.url(), &broker.bootstrap(), extra);
    let mut relay = Relay::start(&config);
    relay.wait_for_slot(pg, SLOT, STARTUP).await;
    let made = wait_until(STARTUP, || async { slot_failover(pg).await == Some(true) }).await;
    assert!(made, "the slot is not a failover slot:\n{}", relay.stderr());
    let status = cli(&["status", "--json"], &config).await;
    assert_eq!(
        status.json()["failover"],
        serde_json::json!(true),
        "{}",
        status.show()
    );
    let check = cli(&["check"], &config).await;
    assert!(
        check.has_line("ok", "is a failover slot"),
        "{}",
        check.show()
    );
}

#[tokio::test]
async fn on_17_the_relay_creates_a_failover_slot() {
    let pg = Pg::start_major(17);
    pg.sql(OUTBOX_DDL).await;
    relay_keeps_a_failover_slot(&pg, "").await;
}

#[tokio::test]
async fn on_17_the_initial_snapshot_copy_becomes_a_failover_slot() {
    let pg = Pg::start_major(17);
    pg.sql(OUTBOX_DDL).await;
    relay_keeps_a_failover_slot(&pg, "initial_snapshot = true").await;
}

#[tokio::test]
async fn on_17_a_slot_made_without_failover_is_reported_then_made_one() {
    let pg = Pg::start_major(17);
    pg.sql(OUTBOX_DDL).await;
    pg.sql(&format!(
        "SELECT pg_create_logical_replication_slot('{SLOT}', 'pgoutput')"
    ))
    .await;
    let config = basic_config(&pg.url(), &format!("127.0.0.1:{}", free_port()));
    let status = cli(&["status", "--json"], &config).await;
    assert_eq!(
        status.json()["failover"],
        serde_json::json!(false),
        "{}",
        status.show()
    );
    let check = cli(&["check"], &config).await;
    assert!(
        check.has_line("WARN", "is not a failover slot")
            && check.has_line(
                "WARN",
                &format!("ALTER_REPLICATION_SLOT {SLOT} ( FAILOVER true )")
            ),
        "{}",
        check.show()
    );
    relay_keeps_a_failover_slot(&pg, "").await;
}

#[tokio::test]
async fn before_17_failover_slot_true_is_one_line_naming_the_version() {
    let pg = Pg::start();
    pg.sql(OUTBOX_DDL).await;
    let config = config_with(
        &pg.url(),
        &format!("127.0.0.1:{}", free_port()),
        "failover_slot = true",
    );
    let out = cli(&["check"], &config).await;
    assert!(
        out.fails().iter().any(|l| l
            .contains("[postgres] failover_slot = true, but PostgreSQL 15 has no failover slots")),
        "{}",
        out.show()
    );
}

#[tokio::test]
async fn with_a_standby_listed_first_the_relay_streams_from_the_primary() {
    let pg = Pg::start_major(17);
    pg.sql(OUTBOX_DDL).await;
    let standby = pg.start_standby("standby1", free_port(), "").await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres",
        standby.port(),
        pg.port()
    );
    let broker = Broker::start();
    let mut relay = Relay::start(&basic_config(&url, &broker.bootstrap()));
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
    // The slot exists only on the primary: a relay that kept the standby could never use it.
    let streams = wait_until(Duration::from_secs(60), || async {
        pg.slot_active(SLOT).await
    })
    .await;
    assert!(
        streams,
        "the relay never streamed from the primary:\n{}",
        relay.stderr()
    );
}
