//! Debezium beside the relay (issue #13): a Kafka Connect worker with Debezium's PostgreSQL
//! connector and Outbox Event Router, started by `scripts/debezium.sh run` (the one place that
//! configures it) as a child process, stopped on drop, its log printed when a test fails.

use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::broker::Broker;
use super::events::SLOT;
use super::pg::Pg;
use super::relay::basic_config;
use super::relay::Relay;
use super::util::tail;

/// `scripts/debezium.sh` of this checkout.
pub fn debezium_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/debezium.sh")
}

/// The directory of Connect's and Debezium's jars (`$OUTBOX_DEBEZIUM_LIBS`, else fetched once
/// by `scripts/debezium.sh libs`). A failed fetch fails the test, naming the cause: a
/// comparison that cannot run is never skipped in silence.
pub fn debezium_libs() -> &'static str {
    static LIBS: OnceLock<String> = OnceLock::new();
    LIBS.get_or_init(|| {
        if let Some(dir) = std::env::var("OUTBOX_DEBEZIUM_LIBS")
            .ok()
            .filter(|d| Path::new(d).join(".fetched").is_file())
        {
            return dir;
        }
        let out = Command::new("bash")
            .arg(debezium_sh())
            .arg("libs")
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/debezium.sh libs");
        assert!(
            out.status.success(),
            "scripts/debezium.sh libs failed: Debezium's and Kafka Connect's jars come from \
             Maven Central (tests/debezium/pom.xml) and are needed for this test; run \
             scripts/test.sh, which installs Java and Maven: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    })
}

/// What the Outbox Event Router's records look like (`scripts/debezium.sh --mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebeziumMode {
    /// Debezium's documented defaults with the JSON converter (schemas on).
    Defaults,
    /// `table.expand.json.payload=true`, JSON converter without schemas.
    RawJson,
    /// String converters, the `type` column as a header, no extended headers.
    Strings,
}

impl DebeziumMode {
    /// The `--mode` argument.
    pub fn arg(self) -> &'static str {
        match self {
            DebeziumMode::Defaults => "defaults",
            DebeziumMode::RawJson => "raw-json",
            DebeziumMode::Strings => "strings",
        }
    }

    /// The slot and publication name for this mode: `debezium_<mode>`.
    pub fn slot(self) -> String {
        format!("debezium_{}", self.arg().replace('-', "_"))
    }

    /// The topic prefix for this mode: `debezium-<mode>.`.
    pub fn prefix(self) -> String {
        format!("debezium-{}.", self.arg())
    }
}

/// A running Connect worker with one Debezium connector on `public.outbox`; stopped with
/// SIGTERM (then SIGKILL) on drop.
pub struct Debezium {
    child: Child,
    dir: TempDir,
    pub mode: DebeziumMode,
    pub started: Instant,
}

impl Debezium {
    /// Creates this mode's slot and publication (so the connector streams every write made
    /// from now on, however long the JVM takes to start), then starts the worker.
    pub async fn start(pg: &Pg, bootstrap: &str, mode: DebeziumMode) -> Debezium {
        Debezium::start_with(pg, bootstrap, mode, &mode.prefix(), &[]).await
    }

    /// As [`Debezium::start`], with the topics behind `prefix` (empty: the relay's own topics,
    /// as for a switch-over) and connector properties `sets` (`key=value`, overriding the
    /// mode's: `scripts/debezium.sh --connector-set`).
    pub async fn start_with(
        pg: &Pg,
        bootstrap: &str,
        mode: DebeziumMode,
        prefix: &str,
        sets: &[&str],
    ) -> Debezium {
        let slot = mode.slot();
        pg.sql(&format!(
            "SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput'); \
             CREATE PUBLICATION {slot} FOR TABLE public.outbox"
        ))
        .await;
        let libs = debezium_libs();
        let dir = tempfile::Builder::new()
            .prefix("outbox-relay-debezium-")
            .tempdir()
            .expect("create temp dir for Kafka Connect");
        let log = File::create(dir.path().join("connect.log")).expect("create connect.log");
        let child = Command::new("bash")
            .arg(debezium_sh())
            .arg("run")
            .args(["--dir", &dir.path().join("worker").display().to_string()])
            .args(["--bootstrap", bootstrap])
            .args(["--mode", mode.arg()])
            .args(["--pg-port", &pg.port().to_string()])
            .args(["--slot", &slot, "--publication", &slot])
            .args(["--prefix", prefix])
            .args(sets.iter().flat_map(|s| ["--connector-set", s]))
            // Three workers share a small machine in the tests; each needs little.
            .args(["--heap", "256m"])
            .env("OUTBOX_DEBEZIUM_LIBS", libs)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("start scripts/debezium.sh run");
        Debezium {
            child,
            dir,
            mode,
            started: Instant::now(),
        }
    }

    /// The worker's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("connect.log")).unwrap_or_default()
    }

    /// Panics with the log's tail if the worker has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "Kafka Connect ({:?}) exited: {status}; log:\n{}",
                self.mode,
                tail(&self.dir.path().join("connect.log"), 60)
            );
        }
    }

    /// SIGTERM, then SIGKILL after 15 s.
    pub fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Debezium {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- Kafka Connect {:?} log (last 60 lines) ---\n{}",
                self.mode,
                tail(&self.dir.path().join("connect.log"), 60)
            );
            let _ = std::io::stderr().flush();
        }
    }
}

/// The relay beside Debezium: creates `outbox.event.{aggregate}` under each of `prefixes`
/// ("" for the relay's own) with `partitions` each, starts the relay on the default outbox
/// with `outbox_line` added to its `[[outbox]]` entry, and waits until it holds its slot.
/// Returns the relay and the topics created, the relay's first.
pub async fn relay_beside(
    pg: &Pg,
    broker: &Broker,
    prefixes: impl IntoIterator<Item = String>,
    aggregates: &[&str],
    partitions: i32,
    outbox_line: &str,
) -> (Relay, Vec<String>) {
    let mut topics = Vec::new();
    for prefix in prefixes {
        for a in aggregates {
            topics.push(format!("{prefix}outbox.event.{a}"));
        }
    }
    for t in &topics {
        broker.create_topic(t, partitions).await;
    }
    let config = basic_config(&pg.url(), &broker.bootstrap()).replace(
        "table = \"public.outbox\"\n",
        &format!("table = \"public.outbox\"\n{outbox_line}\n"),
    );
    assert!(config.contains(outbox_line), "{config}");
    let mut relay = Relay::start(&config);
    relay.wait_for_slot(pg, SLOT, Duration::from_secs(60)).await;
    (relay, topics)
}
