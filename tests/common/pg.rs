//! A throwaway PostgreSQL cluster (`wal_level=logical`, free port, temp dir), run as
//! `postgres` when the tests run as root, plus the outbox tables the tests share.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio_postgres::{Client, NoTls};

use super::pki::TestPki;
use super::util::{free_port, tail, wait_until};

/// `initdb` refuses to run as root; in that case the cluster is run as the `postgres` user.
fn running_as_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        let out = Command::new("id").arg("-u").output().expect("run `id -u`");
        String::from_utf8_lossy(&out.stdout).trim() == "0"
    })
}

/// The server binaries of a run: `OUTBOX_TEST_PG_BIN=/path/to/bin` picks another server for
/// the whole run (scripts/pg-matrix.sh); `None` is whatever `initdb` is on PATH (PostgreSQL 15).
fn default_bin() -> Option<PathBuf> {
    std::env::var_os("OUTBOX_TEST_PG_BIN")
        .filter(|b| !b.is_empty())
        .map(PathBuf::from)
}

/// The bin directory of PostgreSQL `major`, for tests that need that major whatever the run's
/// server (failover slots need 17+): `OUTBOX_TEST_PG<major>_BIN`, which scripts/test.sh sets.
pub fn major_bin(major: u32) -> PathBuf {
    let var = format!("OUTBOX_TEST_PG{major}_BIN");
    match std::env::var_os(&var).filter(|b| !b.is_empty()) {
        Some(bin) => PathBuf::from(bin),
        None => panic!(
            "this test needs PostgreSQL {major}: run it through scripts/test.sh, or set {var} to \
             its bin directory (`. scripts/lib.sh; pg_stage_init; pg_major_bin {major}` prints one)"
        ),
    }
}

/// A command for a PostgreSQL server binary, run as `postgres` when we are root; `bin` (if
/// any) goes first on PATH, and its `../lib` on LD_LIBRARY_PATH if it exists.
fn pg_command(bin: Option<&Path>, program: &str) -> Command {
    let mut cmd = if running_as_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--", program]);
        cmd
    } else {
        Command::new(program)
    };
    if let Some(bin) = bin {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let paths = std::iter::once(bin.to_path_buf()).chain(std::env::split_paths(&path));
        cmd.env(
            "PATH",
            std::env::join_paths(paths).expect("server bin directory in PATH"),
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
    /// The server binaries (see [`default_bin`]).
    bin: Option<PathBuf>,
}

impl Pg {
    /// Creates and starts a cluster; panics with the server log if it cannot.
    pub fn start() -> Pg {
        Pg::start_with_bin(default_bin())
    }

    /// The same on PostgreSQL `major` (see [`major_bin`]).
    pub fn start_major(major: u32) -> Pg {
        Pg::start_with_bin(Some(major_bin(major)))
    }

    fn start_with_bin(bin: Option<PathBuf>) -> Pg {
        let dir = tempfile::Builder::new()
            .prefix("outbox-relay-pg-")
            .tempdir()
            .expect("create temp dir for PostgreSQL");
        let data = dir.path().join("data");
        chown_to_postgres(dir.path());

        let mut initdb = pg_command(bin.as_deref(), "initdb");
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
            let mut pg_ctl = pg_command(bin.as_deref(), "pg_ctl");
            pg_ctl
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "60", "start"]);
            let out = pg_ctl.output().expect("run pg_ctl start");
            if out.status.success() {
                return Pg { dir, port, bin };
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

    /// A command for one of this cluster's server binaries (`pg_ctl`, `pg_basebackup`, ...),
    /// run as `postgres` when the tests run as root.
    pub fn command(&self, program: &str) -> Command {
        pg_command(self.bin.as_deref(), program)
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
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

    /// Appends `settings` (postgresql.conf lines; a later line wins over the harness' own) and
    /// restarts the server on the same port, e.g. `wal_level = replica` for a bad setup.
    pub fn restart_with(&self, settings: &str) {
        let data = self.dir.path().join("data");
        let conf = data.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).expect("read postgresql.conf");
        text += &format!("\n# appended by Pg::restart_with\n{settings}\n");
        fs::write(&conf, text).expect("write postgresql.conf");
        chown_to_postgres(&conf);
        let mut pg_ctl = self.command("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(self.dir.path().join("postgres.log"))
            .args(["-m", "fast", "-w", "-t", "60", "restart"]);
        run_checked(pg_ctl, "pg_ctl restart");
    }

    /// Runs `pg_ctl <args>` on this cluster on the blocking pool (a restart takes seconds and
    /// the tests' runtime has one thread); panics with the server log if it fails.
    async fn pg_ctl(&self, args: &[&str], what: &str) {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("postgres.log");
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let what = what.to_owned();
        let mut cmd = self.command("pg_ctl");
        let out = tokio::task::spawn_blocking(move || {
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

    /// A physical standby of this server, listening on `port` (e.g. a dead primary's, so that
    /// a fixed two-host URL keeps naming both), streaming from the physical slot `slot`
    /// (created here) with `settings` appended to its postgresql.conf; a `Pg` of its own,
    /// with the same binaries. Made from a copy of the data directory taken while this server
    /// is stopped (cleanly, so the copy is consistent; the embedded PostgreSQL builds have no
    /// pg_basebackup), so this server is briefly down.
    pub async fn start_standby(&self, slot: &str, port: u16, settings: &str) -> Pg {
        self.sql(&format!(
            "SELECT pg_create_physical_replication_slot('{slot}', true)"
        ))
        .await;
        let dir = tempfile::Builder::new()
            .prefix("outbox-relay-pg-standby-")
            .tempdir()
            .expect("create temp dir for the standby");
        let data = dir.path().join("data");
        self.stop("fast").await;
        let mut copy = Command::new("cp");
        copy.arg("-a").arg(self.data_dir()).arg(&data);
        run_checked(copy, "copy the primary's data directory");
        self.start_again().await;
        // The primary's slots are not the standby's: a logical one of the same name would
        // keep slot synchronisation from creating its synced copy.
        let slots = data.join("pg_replslot");
        for entry in fs::read_dir(&slots).expect("read pg_replslot").flatten() {
            let _ = fs::remove_dir_all(entry.path());
        }
        let _ = fs::remove_file(data.join("postmaster.pid"));
        let conf = data.join("postgresql.conf");
        let text = fs::read_to_string(&conf).expect("read postgresql.conf")
            + &format!(
                "\n# set by Pg::start_standby\nport = {port}\nunix_socket_directories = '{}'\n\
                 primary_conninfo = 'host=127.0.0.1 port={} user=postgres dbname=postgres application_name={slot}'\n\
                 primary_slot_name = '{slot}'\n{settings}\n",
                dir.path().display(),
                self.port
            );
        fs::write(&conf, text).expect("write postgresql.conf");
        fs::write(data.join("standby.signal"), "").expect("write standby.signal");
        chown_to_postgres(dir.path());
        let standby = Pg {
            dir,
            port,
            bin: self.bin.clone(),
        };
        standby.start_again().await;
        standby
    }

    /// `pg_ctl promote`: a standby becomes a primary (and waits until it is one).
    pub async fn promote(&self) {
        self.pg_ctl(&["-w", "-t", "60", "promote"], "pg_ctl promote")
            .await;
    }

    /// SIGKILL to the postmaster: the server dies as in a crash of its machine (its backends
    /// notice and exit on their own). `pg_ctl stop -m immediate` is [`Pg::stop`].
    pub fn kill9(&self) {
        let pid_file = self.data_dir().join("postmaster.pid");
        let text = fs::read_to_string(&pid_file).expect("read postmaster.pid");
        let pid = text.lines().next().unwrap_or_default().trim().to_owned();
        let status = Command::new("kill")
            .args(["-9", &pid])
            .status()
            .expect("run kill -9");
        assert!(status.success(), "kill -9 {pid} failed");
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
        let mut stop = self.command("pg_ctl");
        stop.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = stop.status();
        // TempDir's own drop deletes the directory (root may delete postgres' files).
    }
}
