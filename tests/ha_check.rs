//! `check` for high availability: on PostgreSQL 17 it warns about each setting a failover slot
//! needs, naming the parameter, on the primary and on each standby that `[postgres] url` lists
//! (libpq multi-host); before 17 it says in one line that failover slots need 17 and that the
//! lost-slot guard is what protects. Judged by the lines `check` prints.
//!
//! The PostgreSQL 17 tests need `OUTBOX_TEST_PG17_BIN` (scripts/test.sh sets it).

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use common::{cli, free_port, Out, Pg, OUTBOX_DDL};
use tempfile::TempDir;

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

fn run(mut cmd: Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A physical standby of `primary` streaming from its physical slot `slot`; stopped on drop.
/// Made from a copy of the primary's data directory taken while the primary is stopped
/// (cleanly, so the copy is consistent), since the PostgreSQL 17 builds the tests use have no
/// pg_basebackup.
struct Standby<'p> {
    primary: &'p Pg,
    dir: TempDir,
    port: u16,
}

impl<'p> Standby<'p> {
    async fn start(primary: &'p Pg, slot: &str) -> Standby<'p> {
        primary
            .sql(&format!(
                "SELECT pg_create_physical_replication_slot('{slot}', true)"
            ))
            .await;
        let dir = tempfile::Builder::new()
            .prefix("outbox-relay-standby-")
            .tempdir()
            .expect("temp dir");
        let data = dir.path().join("data");
        primary.stop("fast").await;
        let mut copy = Command::new("cp");
        copy.arg("-a").arg(primary.data_dir()).arg(&data);
        run(copy, "copy the primary's data directory");
        primary.start_again().await;
        // The copy's own copy of the slot is not the standby's business.
        let _ = fs::remove_dir_all(data.join("pg_replslot").join(slot));
        let port = free_port();
        let conf = data.join("postgresql.conf");
        let text = fs::read_to_string(&conf).expect("read postgresql.conf")
            + &format!(
                "\nport = {port}\nunix_socket_directories = '{}'\n\
                 primary_conninfo = 'host=127.0.0.1 port={} user=postgres dbname=postgres'\n\
                 primary_slot_name = '{slot}'\n",
                dir.path().display(),
                primary.port()
            );
        fs::write(&conf, text).expect("write postgresql.conf");
        fs::write(data.join("standby.signal"), "").expect("write standby.signal");
        chown(&dir.path().to_path_buf());
        let mut pg_ctl = primary.command("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.path().join("standby.log"))
            .args(["-w", "-t", "60", "start"]);
        run(pg_ctl, "pg_ctl start (standby)");
        Standby { primary, dir, port }
    }

    async fn sql(&self, sql: &str) {
        let url = format!("postgres://postgres@127.0.0.1:{}/postgres", self.port);
        common::connect(&url)
            .await
            .expect("connect to the standby")
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("standby: {e}: {sql}"));
    }
}

impl Drop for Standby<'_> {
    fn drop(&mut self) {
        let mut pg_ctl = self.primary.command("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"]);
        let _ = pg_ctl.output();
    }
}

fn chown(path: &PathBuf) {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if root {
        let mut cmd = Command::new("chown");
        cmd.arg("-R").arg("postgres:postgres").arg(path);
        run(cmd, "chown");
    }
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
    let standby = Standby::start(&primary, "standby1").await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres",
        primary.port(),
        standby.port
    );
    let host = format!("127.0.0.1:{}", standby.port);

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
