//! Test harness: a throwaway PostgreSQL cluster, a throwaway Tansu (Kafka) broker and the
//! relay binary, all real processes on loopback. Everything is torn down on `Drop`, so a
//! failing test leaves nothing behind; on panic the relevant logs are printed to help.
//!
//! Tests run on tokio's current-thread runtime (the crate does not enable the multi-thread
//! one), so nothing here blocks for long: Kafka reads poll librdkafka without waiting, and
//! only server start-up and short metadata calls block.
#![allow(dead_code)] // each test binary uses a different subset of the harness
pub mod checker; // the reliability suite's writer and checker (tests/reliability.rs)

use std::collections::HashSet;
use std::fs::{self, File};
use std::future::Future;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tempfile::TempDir;
use tokio_postgres::{Client, NoTls};

// ---------------------------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------------------------

/// A loopback port that was free a moment ago. Another process may grab it before we bind it,
/// so the starters below retry with a fresh port when their server fails to come up.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
    listener.local_addr().expect("local addr").port()
}

/// Polls `check` every 100 ms until it returns true or `timeout` passes; returns whether it
/// became true. Callers assert on the result so their message can say what was awaited.
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The last non-empty line of stderr: where the one-line fatal message must be.
pub fn last_line(stderr: &str) -> String {
    stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .to_owned()
}

/// Formats a WAL position the way PostgreSQL prints it (`16/B374D848`), for messages.
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// The last `n` lines of a log file (or a note that it could not be read).
fn tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

// ---------------------------------------------------------------------------------------------
// Java-compatible murmur2 partitioning
// ---------------------------------------------------------------------------------------------

/// Kafka's Java `Utils.murmur2`: MurmurHash2, seed 0x9747b28c, little-endian 4-byte blocks,
/// returned as the Java signed int.
pub fn java_murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        // Java's switch falls through from 3 to 2 to 1.
        for (i, &b) in rest.iter().enumerate().rev() {
            h ^= u32::from(b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition the Java producer's default partitioner picks for a non-null key:
/// `toPositive(murmur2(key)) % partitions` (librdkafka's `murmur2_random` does the same).
pub fn java_murmur2_partition(key: &[u8], partitions: i32) -> i32 {
    assert!(partitions > 0, "partition count must be positive");
    (java_murmur2(key) & 0x7fff_ffff) % partitions
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------------

/// `initdb` refuses to run as root; in that case the cluster is run as the `postgres` user.
fn running_as_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        let out = Command::new("id").arg("-u").output().expect("run `id -u`");
        String::from_utf8_lossy(&out.stdout).trim() == "0"
    })
}

/// A command for a PostgreSQL server binary, run as `postgres` when we are root.
/// `OUTBOX_TEST_PG_BIN=/path/to/bin` picks another server (scripts/pg-matrix.sh): that
/// directory goes first on PATH, and its `../lib` on LD_LIBRARY_PATH if it exists.
fn pg_command(program: &str) -> Command {
    let mut cmd = if running_as_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--", program]);
        cmd
    } else {
        Command::new(program)
    };
    if let Some(bin) = std::env::var_os("OUTBOX_TEST_PG_BIN").filter(|b| !b.is_empty()) {
        let bin = PathBuf::from(bin);
        let path = std::env::var_os("PATH").unwrap_or_default();
        let paths = std::iter::once(bin.clone()).chain(std::env::split_paths(&path));
        cmd.env(
            "PATH",
            std::env::join_paths(paths).expect("OUTBOX_TEST_PG_BIN in PATH"),
        );
        let lib = bin.join("../lib");
        if lib.is_dir() {
            cmd.env("LD_LIBRARY_PATH", lib);
        }
    }
    cmd
}

fn run_checked(mut cmd: Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what} ({cmd:?}): {e}; is PostgreSQL 15 on PATH?"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes `path` (recursively) belong to `postgres` when we run as root.
fn chown_to_postgres(path: &Path) {
    if running_as_root() {
        let mut cmd = Command::new("chown");
        cmd.arg("-R").arg("postgres:postgres").arg(path);
        run_checked(cmd, "chown");
    }
}

/// The outbox table of the examples: the relay's defaults fit it without column settings.
pub const OUTBOX_DDL: &str = "CREATE TABLE public.outbox (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregatetype text NOT NULL,
    aggregateid text NOT NULL,
    type text NOT NULL,
    payload jsonb
)";

/// An outbox with a fixed aggregate type and a `part` column for `partition_column`
/// (tests/shaping.rs, tests/snapshot.rs).
/// The outbox as a partitioned table (common, so old events can be dropped by partition);
/// its rows live in the partitions (tests/hostile.rs, tests/cli.rs).
pub const PARTITIONED_OUTBOX_DDL: &str = "CREATE TABLE public.outbox (
            id uuid NOT NULL DEFAULT gen_random_uuid(),
            created date NOT NULL DEFAULT '2025-01-15',
            aggregatetype text NOT NULL,
            aggregateid text NOT NULL,
            type text NOT NULL,
            payload jsonb
         ) PARTITION BY RANGE (created);
         CREATE TABLE public.outbox_2025_01 PARTITION OF public.outbox
             FOR VALUES FROM ('2025-01-01') TO ('2025-02-01');
         CREATE TABLE public.outbox_2025_02 PARTITION OF public.outbox
             FOR VALUES FROM ('2025-02-01') TO ('2025-03-01');";

pub const ORDERS_OUTBOX_DDL: &str = "CREATE TABLE public.orders_outbox (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregatetype text NOT NULL DEFAULT 'order',
    aggregateid text NOT NULL,
    type text NOT NULL,
    payload jsonb,
    part int
)";

/// A throwaway PostgreSQL 15 cluster with `wal_level=logical`, trusting loopback connections
/// as `postgres`. Stopped (immediate mode) and deleted on drop.
pub struct Pg {
    dir: TempDir,
    port: u16,
}

impl Pg {
    /// Creates and starts a cluster; panics with the server log if it cannot.
    pub fn start() -> Pg {
        let dir = tempfile::Builder::new()
            .prefix("outbox-relay-pg-")
            .tempdir()
            .expect("create temp dir for PostgreSQL");
        let data = dir.path().join("data");
        chown_to_postgres(dir.path());

        let mut initdb = pg_command("initdb");
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync");
        run_checked(initdb, "initdb");

        // Our own pg_hba.conf: loopback trust for `postgres` and everybody else; roles that
        // must use a password get a `scram-sha-256` line put in front (first match wins).
        fs::write(data.join("pg_hba.conf"), hba_text(&[])).expect("write pg_hba.conf");

        // A few tries in case someone else took the port between free_port() and listen().
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port();
            let settings = format!(
                "\n# set by the outbox-relay test harness\n\
                 port = {port}\n\
                 listen_addresses = '127.0.0.1'\n\
                 unix_socket_directories = '{sock}'\n\
                 wal_level = logical\n\
                 max_wal_senders = 20\n\
                 max_replication_slots = 20\n\
                 max_connections = 50\n\
                 fsync = off\n\
                 full_page_writes = off\n\
                 shared_buffers = 32MB\n\
                 log_min_messages = warning\n",
                sock = dir.path().display(),
            );
            let conf = data.join("postgresql.conf");
            let mut base = fs::read_to_string(&conf).expect("read postgresql.conf");
            if let Some(i) = base.find("\n# set by the outbox-relay test harness") {
                base.truncate(i);
            }
            fs::write(&conf, base + &settings).expect("write postgresql.conf");
            chown_to_postgres(dir.path());

            let log = dir.path().join("postgres.log");
            let mut pg_ctl = pg_command("pg_ctl");
            pg_ctl
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "60", "start"]);
            let out = pg_ctl.output().expect("run pg_ctl start");
            if out.status.success() {
                return Pg { dir, port };
            }
            last_err = format!(
                "{}\n{}\n--- server log ---\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                tail(&log, 30)
            );
        }
        panic!("PostgreSQL did not start:\n{last_err}");
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A libpq-style URL for the superuser `postgres` (no password: loopback is trusted).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A URL for another role with a password (which must be URL-safe as given).
    pub fn url_for(&self, user: &str, password: &str) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/postgres",
            self.port
        )
    }

    /// A new connection as `postgres`; its connection task runs on the test's runtime.
    pub async fn client(&self) -> Client {
        connect(&self.url())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url()))
    }

    /// Runs one or more `;`-separated statements (simple query protocol) on a new connection.
    pub async fn sql(&self, sql: &str) {
        self.client()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("SQL failed: {e}\n{sql}"));
    }

    /// The slot's `confirmed_flush_lsn` as a byte position, `None` if there is no such slot
    /// (or it never confirmed anything).
    pub async fn confirmed_flush_lsn(&self, slot: &str) -> Option<u64> {
        let row = self
            .client()
            .await
            .query_opt(
                "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::text \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("query pg_replication_slots");
        row.and_then(|r| r.get::<_, Option<String>>(0))
            .map(|s| s.parse().expect("numeric LSN"))
    }

    /// Whether a walsender is streaming from the slot right now (`false` if there is no slot).
    pub async fn slot_active(&self, slot: &str) -> bool {
        self.client()
            .await
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("query pg_replication_slots")
            .is_some_and(|r| r.get::<_, bool>(0))
    }

    /// `pg_current_wal_lsn()` as a byte position: everything written so far ends before it.
    pub async fn current_wal_lsn(&self) -> u64 {
        let row = self
            .client()
            .await
            .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::text", &[])
            .await
            .expect("query pg_current_wal_lsn()");
        row.get::<_, String>(0).parse().expect("numeric LSN")
    }

    /// Waits until the slot's `confirmed_flush_lsn` reaches `target`; returns whether it did
    /// (and the last value seen, for the assertion message).
    pub async fn wait_confirmed(
        &self,
        slot: &str,
        target: u64,
        timeout: Duration,
    ) -> (bool, Option<u64>) {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.confirmed_flush_lsn(slot).await;
            if last.is_some_and(|l| l >= target) {
                return (true, last);
            }
            if Instant::now() >= deadline {
                return (false, last);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Creates a LOGIN REPLICATION role with a SCRAM-SHA-256 password and requires
    /// `scram-sha-256` for it on loopback (both for databases and for replication
    /// connections), then reloads the configuration.
    pub async fn create_scram_role(&self, role: &str, password: &str) {
        self.sql(&format!(
            "SET password_encryption = 'scram-sha-256';\n\
             CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{password}';"
        ))
        .await;
        let data = self.dir.path().join("data");
        fs::write(data.join("pg_hba.conf"), hba_text(&[role])).expect("write pg_hba.conf");
        chown_to_postgres(&data.join("pg_hba.conf"));
        self.sql("SELECT pg_reload_conf()").await;
        // The reload is asynchronous: wait until the postmaster shows the new rules.
        let applied = wait_until(Duration::from_secs(10), || async move {
            let rows = self
                .client()
                .await
                .query(
                    "SELECT 1 FROM pg_hba_file_rules \
                     WHERE auth_method = 'scram-sha-256' AND $1 = ANY(user_name)",
                    &[&role],
                )
                .await
                .expect("query pg_hba_file_rules");
            !rows.is_empty()
        })
        .await;
        assert!(applied, "pg_hba.conf rules for {role} not visible");
        // pg_hba_file_rules reads the file; give the postmaster a moment to load it too.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    /// The server log, for diagnostics.
    pub fn log(&self) -> String {
        tail(&self.dir.path().join("postgres.log"), 200)
    }
}

/// pg_hba.conf: `scram_roles` must authenticate with SCRAM, everyone else is trusted.
fn hba_text(scram_roles: &[&str]) -> String {
    let mut s = String::from("# written by the outbox-relay test harness\n");
    for role in scram_roles {
        s += &format!("host all {role} 127.0.0.1/32 scram-sha-256\n");
        s += &format!("host replication {role} 127.0.0.1/32 scram-sha-256\n");
    }
    s += "local all all trust\n\
          local replication all trust\n\
          host all all 127.0.0.1/32 trust\n\
          host replication all 127.0.0.1/32 trust\n";
    s
}

/// Connects with tokio-postgres and drives the connection on the current runtime.
pub async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        // Errors here surface as errors of the queries themselves.
        let _ = connection.await;
    });
    Ok(client)
}

impl Drop for Pg {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- PostgreSQL log (port {}) ---\n{}",
                self.port,
                tail(&self.dir.path().join("postgres.log"), 40)
            );
        }
        let mut stop = pg_command("pg_ctl");
        stop.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = stop.status();
        // TempDir's own drop deletes the directory (root may delete postgres' files).
    }
}

// ---------------------------------------------------------------------------------------------
// Kafka (Tansu)
// ---------------------------------------------------------------------------------------------

/// The `tansu` binary: `$TANSU`, else `tansu` on PATH, else `~/.cargo/bin/tansu`.
fn tansu_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("TANSU") {
        return PathBuf::from(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("tansu");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        let candidate = PathBuf::from(home).join(".cargo/bin/tansu");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "the Tansu Kafka broker is needed by this test but was not found \
         (looked at $TANSU, PATH and ~/.cargo/bin/tansu); install it with \
         `cargo install tansu --locked --features dynostore` or set TANSU=/path/to/tansu"
    );
}

/// One record as a consumer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rec {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// In record order; a header may repeat and may have a null value.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Rec {
    /// The first header of that name; `Some(None)` for a present header with a null value.
    pub fn header(&self, name: &str) -> Option<Option<&[u8]>> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_deref())
    }

    /// The first header of that name as (lossy) text; `None` if absent or null.
    pub fn header_str(&self, name: &str) -> Option<String> {
        self.header(name)
            .flatten()
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The key as (lossy) text.
    pub fn key_str(&self) -> Option<String> {
        self.key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
    }

    /// The value as (lossy) text.
    pub fn value_str(&self) -> Option<String> {
        self.value
            .as_deref()
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

/// A Tansu broker with in-memory storage on a free loopback port; killed on drop.
pub struct Broker {
    child: Child,
    port: u16,
    dir: TempDir,
    admin: AdminClient<DefaultClientContext>,
}

impl Broker {
    /// Starts the broker and waits until it answers metadata requests.
    pub fn start() -> Broker {
        Self::launch("", false, |port| (port, ())).0
    }

    /// SIGSTOP: the broker keeps its sockets open but answers nothing, like a hung host.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Broker::freeze`].
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        let status = Command::new("kill")
            .arg(which)
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {which} {} failed", self.child.id());
    }

    /// Starts Tansu on a free port, advertising the port that `front` puts before it (the
    /// listener itself when there is none), and waits until it answers; retries a few ports.
    /// With `authentication` the harness' clients are locked out, so only the port is awaited.
    fn launch<T>(
        what: &str,
        authentication: bool,
        mut front: impl FnMut(u16) -> (u16, T),
    ) -> (Broker, T) {
        let tansu = tansu_binary();
        let dir = tempfile::Builder::new()
            .prefix("outbox-relay-kafka-")
            .tempdir()
            .expect("create temp dir for Tansu");
        let log_path = dir.path().join("tansu.log");
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port();
            let (advertised, extra) = front(port);
            let log = File::create(&log_path).expect("create tansu.log");
            let mut cmd = Command::new(&tansu);
            cmd.arg("broker")
                .arg("--listener-url")
                .arg(format!("tcp://127.0.0.1:{port}"))
                .arg("--advertised-listener-url")
                .arg(format!("tcp://127.0.0.1:{advertised}"))
                .arg("--storage-engine")
                .arg("memory://tansu/");
            if authentication {
                cmd.arg("--authentication");
            }
            let mut child = cmd
                // Tansu also reads these from the environment; don't let the caller's leak in.
                .env_remove("CLUSTER_ID")
                .env_remove("SCHEMA_REGISTRY")
                .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone log handle"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", tansu.display()));

            let bootstrap = format!("127.0.0.1:{advertised}");
            let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .create()
                .expect("create Kafka admin client");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last_err = format!("tansu exited ({status}):\n{}", tail(&log_path, 30));
                    break;
                }
                let ready = if authentication {
                    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                } else {
                    admin
                        .inner()
                        .fetch_metadata(None, Duration::from_millis(500))
                        .is_ok_and(|m| !m.brokers().is_empty())
                };
                if ready {
                    let broker = Broker {
                        child,
                        port: advertised,
                        dir,
                        admin,
                    };
                    return (broker, extra);
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_err = format!(
                        "tansu did not answer metadata requests within 30 s:\n{}",
                        tail(&log_path, 30)
                    );
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("Kafka broker (tansu){what} did not start: {last_err}");
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Creates a topic and waits until its metadata shows all partitions.
    pub async fn create_topic(&self, name: &str, partitions: i32) {
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = self
            .admin
            .create_topics([&topic], &opts)
            .await
            .unwrap_or_else(|e| panic!("CreateTopics {name}: {e}"));
        for result in results {
            if let Err((topic, code)) = result {
                panic!("CreateTopics {topic} failed: {code}");
            }
        }
        let bootstrap = self.bootstrap();
        let topic_name = name.to_owned();
        let shown = tokio::task::spawn_blocking(move || {
            let consumer = reader_consumer(&bootstrap, &[]);
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if partition_count(&consumer, &topic_name) == Some(partitions) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            false
        })
        .await
        .expect("metadata task");
        assert!(shown, "topic {name:?} never showed {partitions} partitions");
    }

    /// A reader of `topics` from the beginning of all their partitions.
    pub fn reader(&self, topics: &[&str]) -> Reader {
        Reader::new(&self.bootstrap(), topics, &[])
    }

    /// Reads `topics` from the beginning until at least `expected` records arrived and then
    /// nothing new for a quiet spell (so extra records already on their way show up too), or
    /// until `timeout`. Returns what was read either way, so that the caller's assertion
    /// shows the difference. Records are in (topic, partition, offset) order.
    pub async fn read_all(&self, topics: &[&str], expected: usize, timeout: Duration) -> Vec<Rec> {
        let mut reader = self.reader(topics);
        reader.wait_for(expected, timeout, || {}).await;
        reader.settle(QUIET).await;
        reader.records()
    }

    /// The broker's output, for diagnostics.
    pub fn log(&self) -> String {
        tail(&self.dir.path().join("tansu.log"), 200)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- tansu log (port {}) ---\n{}",
                self.port,
                tail(&self.dir.path().join("tansu.log"), 40)
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A consumer that joins no group: partitions are assigned explicitly, nothing is committed.
/// `extra` properties are set last (e.g. `isolation.level`).
fn reader_consumer(bootstrap: &str, extra: &[(&str, &str)]) -> BaseConsumer {
    let mut config = ClientConfig::new();
    for (k, v) in extra {
        config.set(*k, *v);
    }
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "outbox-relay-test-reader")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "100")
        .create()
        .expect("create Kafka consumer")
}

fn partition_count(consumer: &BaseConsumer, topic: &str) -> Option<i32> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(2))
        .ok()?;
    let t = md.topics().iter().find(|t| t.name() == topic)?;
    if t.error().is_some() || t.partitions().is_empty() {
        return None;
    }
    Some(t.partitions().len() as i32)
}

/// How long no new record must arrive before a read counts as complete.
///
/// Why not read up to the high watermarks? Tansu 0.6's ListOffsets(latest) answers "base
/// offset of the newest stored batch + 1", not the high watermark, so librdkafka's
/// `fetch_watermarks` undercounts whenever a batch holds more than one record.
pub const QUIET: Duration = Duration::from_secs(2);

/// A consumer assigned to every partition of some topics from the beginning (no group, no
/// commits). Polling never blocks, so a test can interleave reading with other checks on
/// its single-threaded runtime; librdkafka fetches in its own threads meanwhile.
pub struct Reader {
    consumer: BaseConsumer,
    recs: Vec<Rec>,
    last_new: Instant,
}

impl Reader {
    fn new(bootstrap: &str, topics: &[&str], extra: &[(&str, &str)]) -> Reader {
        let consumer = reader_consumer(bootstrap, extra);
        let mut assignment = TopicPartitionList::new();
        for topic in topics {
            let n = partition_count(&consumer, topic)
                .unwrap_or_else(|| panic!("topic {topic:?} has no metadata; create it first"));
            for p in 0..n {
                assignment
                    .add_partition_offset(topic, p, Offset::Beginning)
                    .expect("add partition");
            }
        }
        consumer.assign(&assignment).expect("assign partitions");
        Reader {
            consumer,
            recs: Vec::new(),
            last_new: Instant::now(),
        }
    }

    /// Takes whatever librdkafka has fetched so far; returns how many records were new.
    pub fn poll(&mut self) -> usize {
        let mut n = 0;
        while let Some(result) = self.consumer.poll(Duration::ZERO) {
            match result {
                Ok(m) => {
                    let headers = m
                        .headers()
                        .map(|hs| {
                            hs.iter()
                                .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                                .collect()
                        })
                        .unwrap_or_default();
                    self.recs.push(Rec {
                        topic: m.topic().to_owned(),
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                        value: m.payload().map(<[u8]>::to_vec),
                        headers,
                    });
                    n += 1;
                }
                // Fetch errors are retried by librdkafka; show them for debugging.
                Err(e) => eprintln!("reader: {e}"),
            }
        }
        if n > 0 {
            self.last_new = Instant::now();
        }
        n
    }

    /// Records read so far.
    pub fn len(&self) -> usize {
        self.recs.len()
    }

    /// Polls until at least `expected` records were read or `timeout` passed, calling
    /// `between` (e.g. `|| relay.assert_running()`) while waiting. Returns whether enough
    /// records arrived.
    pub async fn wait_for(
        &mut self,
        expected: usize,
        timeout: Duration,
        mut between: impl FnMut(),
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll();
            if self.recs.len() >= expected {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            between();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls until nothing new arrived for `quiet`.
    pub async fn settle(&mut self, quiet: Duration) {
        // Even if records stopped arriving long ago, give late ones at least half a spell.
        self.last_new = self.last_new.max(Instant::now() - quiet / 2);
        loop {
            self.poll();
            if self.last_new.elapsed() >= quiet {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything read so far, in (topic, partition, offset) order.
    pub fn records(&self) -> Vec<Rec> {
        let mut recs = self.recs.clone();
        recs.sort_by(|a, b| {
            (&a.topic, a.partition, a.offset).cmp(&(&b.topic, b.partition, b.offset))
        });
        recs
    }
}

// ---------------------------------------------------------------------------------------------
// The relay under test
// ---------------------------------------------------------------------------------------------

/// A `relay.toml` for one outbox table with defaults: `public.outbox` on `pg`, brokers of
/// `broker`, default slot and publication.
pub fn basic_config(pg_url: &str, bootstrap: &str) -> String {
    format!(
        "[postgres]\nurl = \"{pg_url}\"\n\n\
         [[outbox]]\ntable = \"public.outbox\"\n\n\
         [kafka]\nbrokers = \"{bootstrap}\"\n"
    )
}

/// The relay binary under test: this build's, or `OUTBOX_RELAY_BIN` (e.g. a release build
/// for a throughput measurement).
pub fn relay_bin() -> String {
    std::env::var("OUTBOX_RELAY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_outbox-relay").into())
}

/// A running `outbox-relay run --config relay.toml`, its stderr captured to a file.
/// Killed on drop; if the test is panicking, its stderr is printed.
pub struct Relay {
    child: Child,
    dir: TempDir,
    exited: Option<ExitStatus>,
    /// A panic message already carried the stderr: don't print it again on drop.
    stderr_shown: bool,
}

impl Relay {
    /// Writes `config` to a temp file and starts the relay with `RUST_LOG=info`
    /// (unless the caller's RUST_LOG says otherwise).
    pub fn start(config: &str) -> Relay {
        let dir = tempfile::Builder::new()
            .prefix("outbox-relay-run-")
            .tempdir()
            .expect("create temp dir for the relay");
        let config_path = dir.path().join("relay.toml");
        fs::write(&config_path, config).expect("write relay.toml");
        let stderr = File::create(dir.path().join("stderr.log")).expect("create stderr.log");
        let stdout = File::create(dir.path().join("stdout.log")).expect("create stdout.log");
        let child = Command::new(relay_bin())
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("start the outbox-relay binary");
        Relay {
            child,
            dir,
            exited: None,
            stderr_shown: false,
        }
    }

    /// The process id (e.g. for messages).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`: no chance to flush or confirm anything. Waits for the process to be gone.
    pub fn kill9(&mut self) {
        if self.exited.is_none() {
            // Child::kill sends SIGKILL on Unix.
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }

    /// Whether the process has exited (and how), without waiting.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
        }
        self.exited
    }

    /// Waits up to `timeout` for the process to exit on its own; `None` if it is still running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the relay has created its slot and the slot has a consistent start point,
    /// so that everything written afterwards is captured. Fails fast if the relay exits.
    pub async fn wait_for_slot(&mut self, pg: &Pg, slot: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.assert_running();
            if pg.confirmed_flush_lsn(slot).await.is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the relay did not create slot {slot:?} within {timeout:?}; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Everything the relay wrote to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.dir.path().join("stderr.log")).unwrap_or_default())
            .into_owned()
    }

    /// Panics (with the relay's stderr) if the relay has exited: call it while waiting for
    /// progress so a crashed relay fails fast instead of at a timeout.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.try_exit() {
            self.stderr_shown = true;
            panic!(
                "the relay exited unexpectedly ({status}); stderr:\n{}",
                self.stderr()
            );
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() && !self.stderr_shown {
            let text = self.stderr();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!(
                "--- relay stderr (pid {}, last 80 lines) ---\n{}",
                self.child.id(),
                lines[lines.len().saturating_sub(80)..].join("\n")
            );
            let _ = std::io::stderr().flush();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Outbox events: writing them and checking what arrived (shared by the tests)
// ---------------------------------------------------------------------------------------------

/// An outbox row to insert. `seq` counts per key, so consumers can check per-key order.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub aggregatetype: String,
    pub key: String,
    pub event_type: String,
    pub seq: i64,
    /// jsonb text, `None` for SQL NULL.
    pub payload: Option<String>,
}

/// An inserted outbox row, as PostgreSQL stored it (ids and jsonb text from `RETURNING`).
#[derive(Clone, Debug)]
pub struct Event {
    pub id: String,
    pub aggregatetype: String,
    pub key: String,
    pub event_type: String,
    pub seq: i64,
    /// `payload::text`: what PostgreSQL prints for the jsonb, `None` for NULL.
    pub payload: Option<String>,
}

impl Event {
    /// The topic of the default template `outbox.event.{aggregatetype}`.
    pub fn default_topic(&self) -> String {
        format!("outbox.event.{}", self.aggregatetype)
    }
}

/// Hands out per-key sequence numbers and builds payloads carrying them.
#[derive(Default)]
pub struct Seqs(std::collections::HashMap<String, i64>);

impl Seqs {
    /// The next event for `key`, with payload `{"key": …, "seq": n, "note": …}`.
    /// `key` and `note` must not need JSON escaping (no `"` or `\`).
    pub fn event(
        &mut self,
        aggregatetype: &str,
        key: &str,
        event_type: &str,
        note: &str,
    ) -> NewEvent {
        let seq = self.0.entry(key.to_owned()).or_insert(0);
        *seq += 1;
        NewEvent {
            aggregatetype: aggregatetype.to_owned(),
            key: key.to_owned(),
            event_type: event_type.to_owned(),
            seq: *seq,
            payload: Some(format!(
                r#"{{"key": "{key}", "seq": {seq}, "note": "{note}"}}"#,
                seq = *seq
            )),
        }
    }
}

/// Inserts `rows` into `public.outbox` with one statement, in the given order (so per-key
/// sequence order is commit order), on `client`, which may be inside a transaction.
/// Ids are drawn (`gen_random_uuid()`) in the statement so each row's id is known.
pub async fn insert_outbox(
    client: &impl tokio_postgres::GenericClient,
    rows: &[NewEvent],
) -> Vec<Event> {
    let types: Vec<&str> = rows.iter().map(|r| r.aggregatetype.as_str()).collect();
    let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
    let event_types: Vec<&str> = rows.iter().map(|r| r.event_type.as_str()).collect();
    let payloads: Vec<Option<&str>> = rows.iter().map(|r| r.payload.as_deref()).collect();
    let returned = client
        .query(
            "WITH input AS MATERIALIZED (
                 SELECT gen_random_uuid() AS id, aggregatetype, aggregateid, type,
                        payload::jsonb AS payload, n
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                     WITH ORDINALITY AS t(aggregatetype, aggregateid, type, payload, n)
             ), ins AS (
                 INSERT INTO public.outbox (id, aggregatetype, aggregateid, type, payload)
                 SELECT id, aggregatetype, aggregateid, type, payload FROM input ORDER BY n
                 RETURNING id
             )
             SELECT input.id::text, input.payload::text
             FROM input JOIN ins USING (id) ORDER BY input.n",
            &[&types, &keys, &event_types, &payloads],
        )
        .await
        .unwrap_or_else(|e| panic!("insert into outbox: {e}"));
    assert_eq!(returned.len(), rows.len(), "rows inserted");
    rows.iter()
        .zip(returned)
        .map(|(new, row)| Event {
            id: row.get(0),
            aggregatetype: new.aggregatetype.clone(),
            key: new.key.clone(),
            event_type: new.event_type.clone(),
            seq: new.seq,
            // What PostgreSQL prints for the stored jsonb (key order and spacing normalised).
            payload: row.get(1),
        })
        .collect()
}

/// The relay's default slot name.
pub const SLOT: &str = "outbox_relay";

/// How long [`settle`] waits for each stage.
#[derive(Clone, Copy, Debug)]
pub struct Patience {
    /// For all records to be in Kafka (generous: the machine is small; not a benchmark).
    pub delivery: Duration,
    /// After that, for the slot to be confirmed up to the target.
    pub confirm: Duration,
}

/// Waits until `n` records arrived (up to `delivery`, failing fast if the relay dies), then
/// up to `confirm` for the default slot's `confirmed_flush_lsn` to reach `target` (the WAL
/// position taken after the last write), then lets the reader settle so late extras show.
/// Returns the records and how long confirmation took after delivery (or why it failed),
/// for the caller to check after the records, so a delivery problem is reported as such.
pub async fn settle(
    pg: &Pg,
    broker: &Broker,
    relay: &mut Relay,
    topics: &[&str],
    n: usize,
    target: u64,
    patience: Patience,
) -> (Vec<Rec>, Result<Duration, String>) {
    let Patience { delivery, confirm } = patience;
    let mut reader = broker.reader(topics);
    reader
        .wait_for(n, delivery, || relay.assert_running())
        .await;
    relay.assert_running();
    let delivered = Instant::now();
    let (reached, last) = pg.wait_confirmed(SLOT, target, confirm).await;
    let confirmed = if reached {
        Ok(delivered.elapsed())
    } else {
        Err(format!(
            "confirmed_flush_lsn {} did not reach {} (pg_current_wal_lsn() after the last \
             write) within {confirm:?} of {} records being in Kafka",
            last.map_or("NULL".into(), lsn_text),
            lsn_text(target),
            reader.len()
        ))
    };
    reader.settle(QUIET).await;
    (reader.records(), confirmed)
}

/// The outcome of comparing what a consumer read with what was committed.
#[derive(Debug, Default)]
pub struct Delivery {
    /// Records whose `id` header was already seen.
    pub duplicates: usize,
    /// Everything wrong other than duplicates, one line each.
    pub problems: Vec<String>,
}

impl Delivery {
    /// Panics listing the first problems, if any.
    pub fn assert_ok(&self, what: &str) {
        if !self.problems.is_empty() {
            let shown: Vec<&str> = self.problems.iter().take(25).map(String::as_str).collect();
            panic!(
                "{what}: {} problem(s) ({} duplicate record(s)):\n  {}",
                self.problems.len(),
                self.duplicates,
                shown.join("\n  ")
            );
        }
    }
}

/// Checks `recs` (as read by [`Broker::read_all`], in partition/offset order) against the
/// committed `expected` events of the default outbox table:
/// every event arrived; nothing else did; each record has the right topic, key, value,
/// `id`/`type` headers and Java-murmur2 partition; and per key the sequence numbers increase
/// in offset order once repeated ids are skipped. Duplicates are counted, not judged.
pub fn check_delivery(recs: &[Rec], expected: &[Event], partitions: i32) -> Delivery {
    let by_id: std::collections::HashMap<&str, &Event> =
        expected.iter().map(|e| (e.id.as_str(), e)).collect();
    let mut d = Delivery::default();
    let mut seen: HashSet<String> = HashSet::new();
    // Last sequence number per (topic, key), over first deliveries in offset order.
    let mut last_seq: std::collections::HashMap<(String, String), (i64, i64)> = Default::default();
    for r in recs {
        let at = format!("{}[{}]@{}", r.topic, r.partition, r.offset);
        let Some(id) = r.header_str("id") else {
            d.problems.push(format!(
                "{at}: no id header (key {:?}, value {:?})",
                r.key_str(),
                r.value_str()
            ));
            continue;
        };
        let Some(e) = by_id.get(id.as_str()) else {
            d.problems.push(format!(
                "{at}: unexpected record id={id} key={:?} value={:?}",
                r.key_str(),
                r.value_str()
            ));
            continue;
        };
        if r.topic != e.default_topic() {
            d.problems.push(format!(
                "{at}: id={id} expected on topic {}",
                e.default_topic()
            ));
        }
        if r.key.as_deref() != Some(e.key.as_bytes()) {
            d.problems.push(format!(
                "{at}: id={id} key {:?}, expected {:?}",
                r.key_str(),
                e.key
            ));
        }
        if r.value.as_deref() != e.payload.as_deref().map(str::as_bytes) {
            d.problems.push(format!(
                "{at}: id={id} value {:?}, expected {:?}",
                r.value_str(),
                e.payload
            ));
        }
        if r.header_str("type").as_deref() != Some(e.event_type.as_str()) {
            d.problems.push(format!(
                "{at}: id={id} type header {:?}, expected {:?}",
                r.header_str("type"),
                e.event_type
            ));
        }
        let want_partition = java_murmur2_partition(e.key.as_bytes(), partitions);
        if r.partition != want_partition {
            d.problems.push(format!(
                "{at}: key {:?} belongs in partition {want_partition} (Java murmur2)",
                e.key
            ));
        }
        if !seen.insert(id.clone()) {
            d.duplicates += 1;
            continue;
        }
        let slot = last_seq
            .entry((r.topic.clone(), e.key.clone()))
            .or_insert((0, -1));
        if e.seq <= slot.0 {
            d.problems.push(format!(
                "{at}: key {:?} seq {} after seq {} (offset {}): per-key order broken",
                e.key, e.seq, slot.0, slot.1
            ));
        }
        if e.seq > slot.0 {
            *slot = (e.seq, r.offset);
        }
    }
    let missing: Vec<&Event> = expected.iter().filter(|e| !seen.contains(&e.id)).collect();
    if !missing.is_empty() {
        d.problems.insert(
            0,
            format!(
                "{} of {} committed events never arrived, e.g. {:?}",
                missing.len(),
                expected.len(),
                &missing[..missing.len().min(3)]
            ),
        );
    }
    d
}

// ---------------------------------------------------------------------------------------------
// Server settings the default start does not give (appended for tests/cli.rs)
// ---------------------------------------------------------------------------------------------

impl Pg {
    /// Appends `settings` (postgresql.conf lines; a later line wins over the harness' own) and
    /// restarts the server on the same port, e.g. `wal_level = replica` for a bad setup.
    pub fn restart_with(&self, settings: &str) {
        let data = self.dir.path().join("data");
        let conf = data.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).expect("read postgresql.conf");
        text += &format!("\n# appended by Pg::restart_with\n{settings}\n");
        fs::write(&conf, text).expect("write postgresql.conf");
        chown_to_postgres(&conf);
        let mut pg_ctl = pg_command("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(self.dir.path().join("postgres.log"))
            .args(["-m", "fast", "-w", "-t", "60", "restart"]);
        run_checked(pg_ctl, "pg_ctl restart");
    }
}

// ---------------------------------------------------------------------------------------------
// Lifecycle helpers (appended for tests/lifecycle.rs): server restarts, broker loss, signals,
// the relay's HTTP endpoint and its Prometheus text
// ---------------------------------------------------------------------------------------------

impl Pg {
    /// Runs `pg_ctl <args>` on this cluster on the blocking pool (a restart takes seconds and
    /// the tests' runtime has one thread); panics with the server log if it fails.
    async fn pg_ctl(&self, args: &[&str], what: &str) {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("postgres.log");
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let what = what.to_owned();
        let out = tokio::task::spawn_blocking(move || {
            let mut cmd = pg_command("pg_ctl");
            cmd.arg("-D").arg(&data).arg("-l").arg(&log).args(&args);
            let out = cmd.output().expect("run pg_ctl");
            (out, tail(&log, 30))
        })
        .await
        .expect("pg_ctl task");
        let (out, log) = out;
        assert!(
            out.status.success(),
            "{what} failed ({}):\n{}\n{}\n--- server log ---\n{log}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `pg_ctl restart -m <mode>` (`fast`, `immediate`, `smart`) on the same port; waits until
    /// the server accepts connections again (after crash recovery for `immediate`).
    pub async fn restart(&self, mode: &str) {
        self.pg_ctl(
            &["-m", mode, "-w", "-t", "60", "restart"],
            &format!("pg_ctl restart -m {mode}"),
        )
        .await;
    }

    /// `pg_ctl stop -m <mode>`: the server is down until [`Pg::start_again`].
    pub async fn stop(&self, mode: &str) {
        self.pg_ctl(
            &["-m", mode, "-w", "-t", "60", "stop"],
            &format!("pg_ctl stop -m {mode}"),
        )
        .await;
    }

    /// Starts the server stopped by [`Pg::stop`] again, on the same port.
    pub async fn start_again(&self) {
        self.pg_ctl(&["-w", "-t", "60", "start"], "pg_ctl start")
            .await;
    }

    /// The pid of the walsender streaming from `slot`, if one is.
    pub async fn slot_active_pid(&self, slot: &str) -> Option<i32> {
        self.client()
            .await
            .query_opt(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("query pg_replication_slots")
            .and_then(|r| r.get::<_, Option<i32>>(0))
    }
}

impl Broker {
    /// `kill -9` of the broker: it vanishes without closing anything cleanly. Idempotent.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Relay {
    /// Like [`Relay::start`], with extra environment variables for the relay process (e.g.
    /// `RUST_LOG`); they override the defaults.
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Relay {
        let dir = tempfile::Builder::new()
            .prefix("outbox-relay-run-")
            .tempdir()
            .expect("create temp dir for the relay");
        let config_path = dir.path().join("relay.toml");
        fs::write(&config_path, config).expect("write relay.toml");
        let stderr = File::create(dir.path().join("stderr.log")).expect("create stderr.log");
        let stdout = File::create(dir.path().join("stdout.log")).expect("create stdout.log");
        let mut cmd = Command::new(relay_bin());
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start the outbox-relay binary");
        Relay {
            child,
            dir,
            exited: None,
            stderr_shown: false,
        }
    }

    /// Sends SIGTERM (a graceful stop request); does not wait. Use [`Relay::wait_exit`].
    pub fn sigterm(&mut self) {
        if self.try_exit().is_some() {
            return;
        }
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill -TERM");
        assert!(status.success(), "kill -TERM {} failed", self.child.id());
    }
}

/// One plain HTTP/1.1 GET to `127.0.0.1:port` over a std `TcpStream` (short timeouts, so a
/// hung server cannot block the single-threaded test runtime for long): `(status, body)`.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no end of headers in {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    Ok((status, body.to_owned()))
}

/// One sample of a Prometheus text exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// A parsed `/metrics` page.
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    /// The raw text, for messages.
    pub text: String,
}

impl Scrape {
    /// Parses the text format (comments skipped; label values without escapes beyond `\"`
    /// and `\\`, which is all the relay's labels need).
    pub fn parse(text: &str) -> Scrape {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or(f64::NAN),
            };
            let (name, labels) = match series.split_once('{') {
                None => (series.to_owned(), Vec::new()),
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').unwrap_or(rest);
                    (name.to_owned(), parse_labels(inner))
                }
            };
            samples.push(Sample {
                name,
                labels,
                value,
            });
        }
        Scrape {
            samples,
            text: text.to_owned(),
        }
    }

    /// Samples named `name` whose labels include all of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        })
    }

    /// The value of the first sample named `name` with (at least) `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.matching(name, labels).next().map(|s| s.value)
    }

    /// The sum over every sample named `name` with (at least) `labels`; 0 if none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }
}

fn parse_labels(inner: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = inner;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_owned();
        let after = &rest[eq + 1..];
        let Some(after) = after.strip_prefix('"') else {
            break;
        };
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(match n {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                other => value.push(other),
            }
        }
        out.push((key, value));
        rest = &after[end..];
    }
    out
}

/// GETs `/metrics` from the relay's endpoint on `port` and parses it.
pub fn scrape(port: u16) -> std::io::Result<Scrape> {
    let (status, body) = http_get(port, "/metrics")?;
    if status != 200 {
        return Err(std::io::Error::other(format!(
            "/metrics answered {status}: {body}"
        )));
    }
    Ok(Scrape::parse(&body))
}

/// Like [`insert_outbox`], but returns the error instead of panicking: for writers that must
/// survive the server going away under them.
pub async fn try_insert_outbox(
    client: &impl tokio_postgres::GenericClient,
    rows: &[NewEvent],
) -> Result<Vec<Event>, tokio_postgres::Error> {
    let types: Vec<&str> = rows.iter().map(|r| r.aggregatetype.as_str()).collect();
    let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
    let event_types: Vec<&str> = rows.iter().map(|r| r.event_type.as_str()).collect();
    let payloads: Vec<Option<&str>> = rows.iter().map(|r| r.payload.as_deref()).collect();
    let returned = client
        .query(
            "WITH input AS MATERIALIZED (
                 SELECT gen_random_uuid() AS id, aggregatetype, aggregateid, type,
                        payload::jsonb AS payload, n
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                     WITH ORDINALITY AS t(aggregatetype, aggregateid, type, payload, n)
             ), ins AS (
                 INSERT INTO public.outbox (id, aggregatetype, aggregateid, type, payload)
                 SELECT id, aggregatetype, aggregateid, type, payload FROM input ORDER BY n
                 RETURNING id
             )
             SELECT input.id::text, input.payload::text
             FROM input JOIN ins USING (id) ORDER BY input.n",
            &[&types, &keys, &event_types, &payloads],
        )
        .await?;
    assert_eq!(returned.len(), rows.len(), "rows inserted");
    Ok(rows
        .iter()
        .zip(returned)
        .map(|(new, row)| Event {
            id: row.get(0),
            aggregatetype: new.aggregatetype.clone(),
            key: new.key.clone(),
            event_type: new.event_type.clone(),
            seq: new.seq,
            payload: row.get(1),
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// TLS helpers (appended for tests/tls.rs): a test CA, PostgreSQL with ssl = on, and a TLS
// front for Tansu (whose own --cert/--key do not work in 0.6.0; see tests/tls.rs)
// ---------------------------------------------------------------------------------------------

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A throwaway CA and a server certificate it signed, as PEM text and files.
pub struct TestPki {
    dir: TempDir,
    /// The CA certificate (PEM), for `sslrootcert` / `ssl.ca.location`.
    pub ca_pem: String,
    /// The server certificate (PEM).
    pub cert_pem: String,
    /// The server's private key (PEM).
    pub key_pem: String,
}

impl TestPki {
    /// A CA (ECDSA P-256) and a server certificate for `names` (DNS names and IP addresses).
    pub fn new(names: &[&str]) -> TestPki {
        TestPki::with_ca_algorithm(names, &rcgen::PKCS_ECDSA_P256_SHA256)
    }

    /// Like [`TestPki::new`] with a CA key of `algorithm`, which also decides how the server
    /// certificate is signed (and so the hash SCRAM channel binding uses).
    pub fn with_ca_algorithm(
        names: &[&str],
        algorithm: &'static rcgen::SignatureAlgorithm,
    ) -> TestPki {
        let dir = tempfile::Builder::new()
            .prefix("outbox-relay-pki-")
            .tempdir()
            .expect("create temp dir for certificates");
        let ca_key = rcgen::KeyPair::generate_for(algorithm).expect("generate CA key");
        let mut ca_params =
            rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "outbox-relay test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("generate server key");
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(names).expect("server parameters");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "outbox-relay test server");
        let cert = params.signed_by(&key, &issuer).expect("sign server cert");
        let pki = TestPki {
            dir,
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        fs::write(pki.ca_path(), &pki.ca_pem).expect("write ca.pem");
        pki
    }

    /// The CA certificate's file.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
}

impl Pg {
    /// Turns TLS on with `pki`'s server certificate, puts `hba_lines` in front of the default
    /// trust rules (first match wins) and reloads; both settings take effect without restart.
    pub async fn enable_tls(&self, pki: &TestPki, hba_lines: &[&str]) {
        let data = self.dir.path().join("data");
        fs::write(data.join("server.crt"), &pki.cert_pem).expect("write server.crt");
        let key = data.join("server.key");
        fs::write(&key, &pki.key_pem).expect("write server.key");
        // PostgreSQL refuses a key that others can read.
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod server.key");
        let conf = data.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).expect("read postgresql.conf");
        text += "\n# appended by Pg::enable_tls\nssl = on\nssl_cert_file = 'server.crt'\n\
                 ssl_key_file = 'server.key'\nlog_connections = on\n";
        fs::write(&conf, text).expect("write postgresql.conf");
        let mut hba = String::from("# TLS rules of Pg::enable_tls\n");
        for line in hba_lines {
            hba += line;
            hba += "\n";
        }
        fs::write(data.join("pg_hba.conf"), hba + &hba_text(&[])).expect("write pg_hba.conf");
        chown_to_postgres(&data);
        self.sql("SELECT pg_reload_conf()").await;
        let on = wait_until(Duration::from_secs(10), || async move {
            let row = self
                .client()
                .await
                .query_one("SELECT current_setting('ssl')", &[])
                .await
                .expect("SHOW ssl");
            row.get::<_, String>(0) == "on"
        })
        .await;
        assert!(on, "ssl did not turn on after reload:\n{}", self.log());
        // The postmaster loads certificates and rules on the reload; give it a moment.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A TLS-terminating front for a Kafka broker on loopback: connections that open with a TLS
/// record are decrypted with the test certificate, anything else is passed through, and
/// both go to the broker's plaintext port. It runs on its own thread, so tests that block
/// their runtime do not stall it. Stopped on drop.
pub struct TlsFront {
    port: u16,
    sessions: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TlsFront {
    /// Listens on a free loopback port and forwards to 127.0.0.1:`upstream`.
    pub fn start(upstream: u16, pki: &TestPki) -> TlsFront {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(pki.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("parse server certificate PEM");
        let key = PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes()).expect("parse key PEM");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server certificate and key");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the TLS front");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let port = listener.local_addr().expect("local addr").port();
        let sessions = Arc::new(AtomicUsize::new(0));
        let counted = sessions.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime for the TLS front");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                let serve = async {
                    loop {
                        let Ok((client, _)) = listener.accept().await else {
                            continue;
                        };
                        tokio::spawn(front_connection(
                            client,
                            upstream,
                            acceptor.clone(),
                            counted.clone(),
                        ));
                    }
                };
                tokio::select! {
                    _ = stopped => {}
                    _ = serve => {}
                }
            });
        });
        TlsFront {
            port,
            sessions,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The front's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many TLS handshakes completed so far.
    pub fn tls_sessions(&self) -> usize {
        self.sessions.load(Ordering::SeqCst)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn front_connection(
    client: tokio::net::TcpStream,
    upstream: u16,
    acceptor: tokio_rustls::TlsAcceptor,
    sessions: Arc<AtomicUsize>,
) {
    // A Kafka frame starts with its length (first byte 0 below 16 MiB), TLS with 0x16.
    let mut first = [0u8; 1];
    if !matches!(client.peek(&mut first).await, Ok(1)) {
        return;
    }
    let Ok(mut broker) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    if first[0] == 0x16 {
        let Ok(mut tls) = acceptor.accept(client).await else {
            return;
        };
        sessions.fetch_add(1, Ordering::SeqCst);
        let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
    } else {
        let mut client = client;
        let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
    }
}

impl Broker {
    /// Starts Tansu behind a [`TlsFront`] that it advertises, so clients reach it over TLS
    /// (or plaintext) through the front. `authentication` makes Tansu require SASL (SCRAM
    /// only, users in its in-memory store), which locks the harness' own clients out: then
    /// only the port is awaited and the broker can only be used to watch clients fail.
    pub fn start_behind_tls(pki: &TestPki, authentication: bool) -> (Broker, TlsFront) {
        Self::launch(" behind the TLS front", authentication, |port| {
            let front = TlsFront::start(port, pki);
            (front.port(), front)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Broker restart (appended for tests/lifecycle.rs)
// ---------------------------------------------------------------------------------------------

impl Broker {
    /// After [`Broker::kill`]: a new Tansu on the same port (so clients reconnect to the
    /// address they know), with empty storage: topics must be created again. Waits until it
    /// answers metadata requests. Note: a producer that knew the old broker keeps getting
    /// UNKNOWN_PRODUCER_ID from the new one (Tansu 0.6 in-memory), so to test Kafka coming
    /// back use [`Broker::start_behind_proxy`] and cut/restore the proxy instead.
    pub fn start_again(&mut self) {
        let log_path = self.dir.path().join("tansu-again.log");
        let log = File::create(&log_path).expect("create tansu-again.log");
        let port = self.port;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut child = Command::new(tansu_binary())
                .arg("broker")
                .arg("--listener-url")
                .arg(format!("tcp://127.0.0.1:{port}"))
                .arg("--advertised-listener-url")
                .arg(format!("tcp://127.0.0.1:{port}"))
                .arg("--storage-engine")
                .arg("memory://tansu/")
                .env_remove("CLUSTER_ID")
                .env_remove("SCHEMA_REGISTRY")
                .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone log handle"))
                .stderr(log.try_clone().expect("clone log handle"))
                .spawn()
                .expect("start tansu again");
            // The port may still be held for a moment after the kill: retry until it binds.
            let up = loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break false;
                }
                let ready = self
                    .admin
                    .inner()
                    .fetch_metadata(None, Duration::from_millis(500))
                    .is_ok_and(|m| !m.brokers().is_empty());
                if ready {
                    break true;
                }
                if Instant::now() >= deadline {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            if up {
                self.child = child;
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(
                Instant::now() < deadline,
                "tansu did not come back on port {port}:\n{}",
                tail(&log_path, 30)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A broker behind a TCP proxy that can be cut and restored (appended for tests/lifecycle.rs):
// Kafka unreachable without losing the broker's state, as in a network partition
// ---------------------------------------------------------------------------------------------

/// A loopback TCP forwarder on its own threads. While cut, it closes every open connection
/// and every new one at once (the client sees the broker go away); restored, it forwards
/// again. Stopped on drop.
pub struct CutProxy {
    port: u16,
    state: std::sync::Arc<CutState>,
}

#[derive(Default)]
struct CutState {
    cut: std::sync::atomic::AtomicBool,
    stop: std::sync::atomic::AtomicBool,
    open: std::sync::Mutex<Vec<std::net::TcpStream>>,
}

impl CutProxy {
    /// Listens on a free loopback port and forwards to 127.0.0.1:`upstream`.
    pub fn start(upstream: u16) -> CutProxy {
        use std::sync::atomic::Ordering::Relaxed;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let port = listener.local_addr().expect("proxy addr").port();
        let state = std::sync::Arc::new(CutState::default());
        let st = state.clone();
        std::thread::spawn(move || {
            while !st.stop.load(Relaxed) {
                let (client, _) = match listener.accept() {
                    Ok(c) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                if st.cut.load(Relaxed) {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let _ = client.set_nonblocking(false);
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut open = st.open.lock().unwrap_or_else(|e| e.into_inner());
                    open.extend(client.try_clone().ok());
                    open.extend(server.try_clone().ok());
                }
                for (mut from, mut to) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        CutProxy { port, state }
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes every connection and refuses new ones until [`CutProxy::restore`].
    pub fn cut(&self) {
        self.state
            .cut
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut open = self.state.open.lock().unwrap_or_else(|e| e.into_inner());
        for s in open.drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.state
            .cut
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.state
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.cut();
    }
}

impl Broker {
    /// Starts Tansu advertising a [`CutProxy`] in front of it, so every client (the relay
    /// and the harness' own) reaches it through the proxy; `bootstrap()` is the proxy.
    pub fn start_behind_proxy() -> (Broker, CutProxy) {
        Self::launch(" behind a proxy", false, |port| {
            let proxy = CutProxy::start(port);
            (proxy.port(), proxy)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Reading from any cluster (appended for tests/broker_faults.rs: librdkafka's mock cluster)
// ---------------------------------------------------------------------------------------------

impl Reader {
    /// A reader of `topics` on the cluster at `bootstrap` (e.g. an `rdkafka::mocking`
    /// cluster rather than a [`Broker`]), from the beginning of every partition.
    pub fn at(bootstrap: &str, topics: &[&str]) -> Reader {
        Reader::new(bootstrap, topics, &[])
    }

    /// Like [`Reader::at`], as a consumer with `isolation.level=read_committed`.
    pub fn read_committed(bootstrap: &str, topics: &[&str]) -> Reader {
        Reader::new(bootstrap, topics, &[("isolation.level", "read_committed")])
    }
}

/// The slot must still hold the row with event id `id`: a restart would send it again. The
/// slot's own changes are peeked (nothing is consumed) once the relay has released it.
///
/// Why not compare `confirmed_flush_lsn` with a WAL position taken before the row? The relay
/// may rightly confirm a keepalive's WAL end that lies inside a large transaction still being
/// written (nothing of it has been decoded yet); PostgreSQL sends a transaction again when its
/// commit record lies after the confirmed position, which is what this checks.
pub async fn assert_slot_holds(pg: &Pg, id: &str, what: &str) {
    let client = pg.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let held = loop {
        let peek = client
            .query_one(
                "SELECT count(*) FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, \
                 'proto_version', '1', 'publication_names', 'outbox_relay') \
                 WHERE position($2::bytea IN data) > 0",
                &[&SLOT, &id.as_bytes()],
            )
            .await;
        match peek {
            Ok(row) => break row.get::<_, i64>(0),
            // The walsender may hold the slot a moment after the relay exits.
            Err(e) if Instant::now() < deadline => {
                eprintln!("{what}: peeking the slot: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{what}: cannot peek the slot: {e}"),
        }
    };
    let confirmed = pg
        .confirmed_flush_lsn(SLOT)
        .await
        .map_or("NULL".into(), lsn_text);
    assert!(
        held > 0,
        "{what}: the slot (confirmed to {confirmed}) no longer holds event {id}: a restart \
         would skip it"
    );
}

/// Waits until the slot is confirmed up to the WAL end as of now (everything before is done).
pub async fn assert_caught_up(pg: &Pg, relay: &mut Relay, what: &str, within: Duration) {
    relay.assert_running();
    let target = pg.current_wal_lsn().await;
    let (reached, last) = pg.wait_confirmed(SLOT, target, within).await;
    assert!(
        reached,
        "{what}: confirmed_flush_lsn {} did not reach {} within {within:?}",
        last.map_or("NULL".into(), lsn_text),
        lsn_text(target)
    );
}
