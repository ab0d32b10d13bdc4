//! The relay binary under test as a child process: started with a config, stopped by
//! signal or `kill -9`, its stderr kept for assertions and printed when a test fails.

use std::fs::{self, File};
use std::io::Write as _;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::pg::Pg;
use super::util::last_line;

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
        Relay::start_with_env(config, &[])
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

    /// Waits up to `timeout` for the relay to exit on its own and asserts that it failed
    /// with the one-line error as its last stderr line; returns that line.
    pub async fn expect_fatal_exit(&mut self, timeout: Duration, what: &str) -> String {
        let status = self.wait_exit(timeout).await;
        let stderr = self.stderr();
        let status = status.unwrap_or_else(|| {
            panic!("{what}: still running after {timeout:?}; stderr:\n{stderr}")
        });
        assert!(
            !status.success(),
            "{what}: exit {status}, expected a failure; stderr:\n{stderr}"
        );
        let line = last_line(&stderr);
        assert!(
            line.starts_with("outbox-relay: error: "),
            "{what}: the last stderr line is not the error: {line:?}; stderr:\n{stderr}"
        );
        eprintln!("{what}: {status}; {line}");
        line
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
