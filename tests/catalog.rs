//! `check`, `run` and `status` judge the slot, the publication and the server by the same
//! rules, against a real PostgreSQL 15 and Apache Kafka: where `run`
//! refuses to start, `check` fails with the same words, and a server that is a standby (in
//! recovery) is named as such by all three, once, instead of being retried forever.

mod common;

use std::time::Duration;

use common::{
    basic_config, cli, last_line, Broker, Pg, Relay, OUTBOX_DDL, PARTITIONED_OUTBOX_DDL, SLOT,
};

/// Generous: the machine is small and shared; this bounds waiting, it measures nothing.
const STARTUP: Duration = Duration::from_secs(60);
/// How long a refusal may take: start-up checks, not a retry loop.
const REFUSAL: Duration = Duration::from_secs(30);
const TOPIC: &str = "outbox.event.order";
const STANDBY: &str = "connected to a standby (in recovery): point [postgres] url at the primary";

/// Starts `run` and expects it to give up on its own, quickly: returns its one-line error.
async fn run_refuses(config: &str, what: &str) -> String {
    let mut relay = Relay::start(config);
    let line = relay.expect_fatal_exit(REFUSAL, what).await;
    line.trim_start_matches("outbox-relay: error: ").to_owned()
}

async fn slots(pg: &Pg) -> Vec<String> {
    pg.client()
        .await
        .query("SELECT slot_name::text FROM pg_replication_slots", &[])
        .await
        .expect("query pg_replication_slots")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn in_recovery(pg: &Pg) -> bool {
    pg.client()
        .await
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .expect("query pg_is_in_recovery()")
        .get(0)
}

/// Restarts the cluster as a standby of nothing: with `standby.signal` and no primary it stays
/// in recovery, read-only, with its slots and publications in place. Cheaper than a base
/// backup, and what a standby looks like to a client.
async fn make_standby(pg: &Pg) {
    let data: String = pg
        .client()
        .await
        .query_one("SHOW data_directory", &[])
        .await
        .expect("SHOW data_directory")
        .get(0);
    pg.stop("fast").await;
    std::fs::write(std::path::Path::new(&data).join("standby.signal"), "")
        .expect("write standby.signal");
    pg.start_again().await;
    assert!(
        in_recovery(pg).await,
        "the cluster did not come back as a standby"
    );
}

/// A partitioned outbox in a publication without `publish_via_partition_root`: pgoutput would
/// send its rows under the partitions' names, which match no `[[outbox]]` entry. `check` fails
/// with exactly the line `run` stops with, and doing what it says makes both pass.
#[tokio::test]
async fn check_and_run_refuse_a_partitioned_outbox_published_without_its_root_alike() {
    let pg = Pg::start();
    let broker = Broker::start();
    broker.create_topic(TOPIC, 1).await;
    pg.sql(PARTITIONED_OUTBOX_DDL).await;
    pg.sql("CREATE PUBLICATION outbox_relay FOR TABLE public.outbox WITH (publish = 'insert')")
        .await;
    let config = basic_config(&pg.url(), &broker.bootstrap());

    let check = cli(&["check"], &config).await;
    let reason = check.one_failure();
    for needle in [
        "publication outbox_relay",
        "public.outbox",
        "ALTER PUBLICATION outbox_relay SET (publish_via_partition_root = true)",
    ] {
        assert!(reason.contains(needle), "{needle:?} missing: {reason}");
    }

    let refusal = run_refuses(&config, "partitioned outbox").await;
    assert_eq!(refusal, reason, "run and check give different reasons");
    assert!(
        slots(&pg).await.is_empty(),
        "run made a slot before refusing"
    );

    // Done as both say, the same setup passes and runs.
    pg.sql("ALTER PUBLICATION outbox_relay SET (publish_via_partition_root = true)")
        .await;
    let check = cli(&["check"], &config).await;
    assert_eq!(check.code, Some(0), "{}", check.show());
    let mut relay = Relay::start(&config);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;
}

/// `run`, `check` and `status` pointed at a standby: one line naming it and the fix, and
/// `run` stops instead of retrying a server that stays a standby.
#[tokio::test]
async fn check_run_and_status_name_a_standby() {
    let pg = Pg::start();
    let broker = Broker::start();
    broker.create_topic(TOPIC, 1).await;
    pg.sql(OUTBOX_DDL).await;
    // Everything else is ready, so the standby is the one thing to report.
    pg.sql(
        "CREATE PUBLICATION outbox_relay FOR TABLE public.outbox \
             WITH (publish = 'insert', publish_via_partition_root = true)",
    )
    .await;
    // Apart: a slot cannot be created in a transaction that has written.
    pg.sql(&format!(
        "SELECT pg_create_logical_replication_slot('{SLOT}', 'pgoutput')"
    ))
    .await;
    make_standby(&pg).await;
    let config = basic_config(&pg.url(), &broker.bootstrap());

    let check = cli(&["check"], &config).await;
    assert_eq!(check.one_failure(), STANDBY);

    assert_eq!(run_refuses(&config, "standby").await, STANDBY);

    let status = cli(&["status", "--json"], &config).await;
    assert_eq!(status.code, Some(1), "{}", status.show());
    let json: serde_json::Value =
        serde_json::from_str(status.stdout.trim()).expect("status --json prints JSON");
    assert_eq!(json["ok"], false, "{json}");
    assert_eq!(json["problem"], STANDBY, "{json}");
    assert_eq!(json["exists"], true, "{json}");
}

/// A relay streaming when its server comes back as a standby (a failover that demoted it)
/// stops with the standby line rather than reconnecting forever.
#[tokio::test]
async fn a_running_relay_whose_server_becomes_a_standby_stops_saying_so() {
    let pg = Pg::start();
    let broker = Broker::start();
    broker.create_topic(TOPIC, 1).await;
    pg.sql(OUTBOX_DDL).await;
    let config = basic_config(&pg.url(), &broker.bootstrap());
    let mut relay = Relay::start(&config);
    relay.wait_for_slot(&pg, SLOT, STARTUP).await;

    make_standby(&pg).await;
    let status = relay.wait_exit(STARTUP).await;
    let stderr = relay.stderr();
    let status = status.unwrap_or_else(|| {
        panic!("still running {STARTUP:?} after its server became a standby:\n{stderr}")
    });
    assert!(!status.success(), "exit {status}:\n{stderr}");
    let line = last_line(&stderr);
    eprintln!("became a standby: {status}; {line}");
    assert!(
        line.starts_with("outbox-relay: error: ") && line.contains(STANDBY),
        "the last line should name the standby and the fix: {line:?}\n{stderr}"
    );
}
