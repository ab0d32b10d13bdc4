//! `check` for high availability: on PostgreSQL 17 it warns about each setting a failover slot
//! needs, naming the parameter, on the primary and on each standby that `[postgres] url` lists
//! (libpq multi-host); before 17 it says in one line that failover slots need 17 and that the
//! lost-slot guard is what protects. Judged by the lines `check` prints.
//!
//! The PostgreSQL 17 tests need `OUTBOX_TEST_PG17_BIN` (scripts/test.sh sets it).

mod common;

use std::fs;

use common::{cli, free_port, Out, Pg, OUTBOX_DDL};

/// A config whose Kafka is unreachable at once: these tests judge only the PostgreSQL lines.
fn config(url: &str) -> String {
    format!(
        "[postgres]\nurl = \"{url}\"\n\n[[outbox]]\ntable = \"public.outbox\"\n\n\
         [kafka]\nbrokers = \"127.0.0.1:{}\"\n\n[kafka.properties]\n\"socket.timeout.ms\" = \"1000\"\n",
        free_port()
    )
}

fn warns(out: &Out) -> Vec<String> {
    out.with_label("WARN")
        .iter()
        .map(|l| l.trim_start_matches("WARN").trim().to_owned())
        .collect()
}

#[tokio::test]
async fn a_lone_primary_17_with_defaults_is_told_what_failover_slots_need() {
    let pg = Pg::start_major(17);
    // As the migrations' least-privilege role: the settings are readable without superuser.
    let root = env!("CARGO_MANIFEST_DIR");
    for file in ["migrations/001_outbox.sql", "migrations/002_relay_role.sql"] {
        let sql = fs::read_to_string(format!("{root}/{file}")).expect("read migration");
        pg.sql(&sql).await;
    }
    let url = format!("postgres://outbox_relay@127.0.0.1:{}/postgres", pg.port());
    let out = cli(&["check"], &config(&url)).await;
    let warns = warns(&out);
    assert_eq!(warns.len(), 1, "{}", out.show());
    assert!(
        warns[0].starts_with("synchronized_standby_slots is not set on the primary")
            && warns[0].contains("there is no physical slot yet"),
        "{}",
        out.show()
    );
    assert!(
        out.has_line(
            "info  ",
            "standby settings not checked: [postgres] url names one host"
        ) && out.has_line("info  ", "postgres://primary:5432,standby:5432/app"),
        "{}",
        out.show()
    );
}

#[tokio::test]
async fn a_standby_listed_in_the_url_is_judged_setting_by_setting() {
    let primary = Pg::start_major(17);
    primary.sql(OUTBOX_DDL).await;
    let standby = primary.start_standby("standby1", free_port(), "").await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres",
        primary.port(),
        standby.port()
    );
    let host = format!("127.0.0.1:{}", standby.port());

    // primary_slot_name is set; the rest are PostgreSQL's defaults.
    let out = cli(&["check"], &config(&url)).await;
    let warns = warns(&out);
    let wanted = [
        "synchronized_standby_slots is not set on the primary".to_owned(),
        format!("standby {host}: sync_replication_slots is off"),
        format!("standby {host}: hot_standby_feedback is off"),
    ];
    assert_eq!(warns.len(), wanted.len(), "{}", out.show());
    for (warn, start) in warns.iter().zip(&wanted) {
        assert!(
            warn.starts_with(start.as_str()),
            "{start:?}:\n{}",
            out.show()
        );
    }
    assert!(
        warns[0].contains("physical slots here: standby1"),
        "{}",
        out.show()
    );

    // Set as the README says: nothing left to warn about.
    // (ALTER SYSTEM cannot share a batch: that is one implicit transaction.)
    primary
        .sql("ALTER SYSTEM SET synchronized_standby_slots = 'standby1'")
        .await;
    primary.sql("SELECT pg_reload_conf()").await;
    standby
        .sql("ALTER SYSTEM SET sync_replication_slots = on")
        .await;
    standby
        .sql("ALTER SYSTEM SET hot_standby_feedback = on")
        .await;
    standby.sql("SELECT pg_reload_conf()").await;
    let settled = common::wait_until(std::time::Duration::from_secs(20), || async {
        self::warns(&cli(&["check"], &config(&url)).await).is_empty()
    })
    .await;
    let out = cli(&["check"], &config(&url)).await;
    assert!(settled, "warnings left:\n{}", out.show());
    assert!(
        out.has_line(
            "ok    ",
            "synchronized_standby_slots = standby1 on the primary"
        ) && out.has_line("ok    ", &format!("standby {host} synchronises slots")),
        "{}",
        out.show()
    );
}

#[tokio::test]
async fn before_17_check_says_failover_slots_need_17_and_the_guard_protects() {
    let pg = Pg::start();
    pg.sql(OUTBOX_DDL).await;
    let out = cli(&["check"], &config(&pg.url())).await;
    assert!(
        out.has_line("info  ", "failover slots need PostgreSQL 17 (server 1")
            && out.has_line("info  ", "lost-slot guard"),
        "{}",
        out.show()
    );
    assert!(
        warns(&out)
            .iter()
            .all(|w| !w.contains("synchronized_standby_slots")),
        "{}",
        out.show()
    );
}
