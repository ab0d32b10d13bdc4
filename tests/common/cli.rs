//! One-shot commands (`check`, `status`, `init`): run the binary to completion and keep
//! what it printed.

use std::path::PathBuf;
use std::process::Command;

use tempfile::TempDir;

use super::relay::relay_bin;

/// What one `outbox-relay <command>` printed and how it exited.
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }

    pub fn with_label(&self, label: &str) -> Vec<&str> {
        self.lines()
            .into_iter()
            .filter(|l| l.split_whitespace().next() == Some(label))
            .collect()
    }

    pub fn show(&self) -> String {
        format!(
            "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    /// No panic, whatever happened.
    pub fn assert_no_panic(&self) {
        assert!(
            !self.stderr.contains("panicked"),
            "the binary panicked:\n{}",
            self.show()
        );
    }

    /// Exit 0 and only `ok`/`info` lines.
    pub fn assert_all_ok(&self) {
        self.assert_no_panic();
        let bad: Vec<&str> = self
            .lines()
            .into_iter()
            .filter(|l| !(l.starts_with("ok    ") || l.starts_with("info  ")))
            .collect();
        assert!(
            self.code == Some(0) && bad.is_empty() && !self.stdout.is_empty(),
            "check should pass with every line ok; not ok: {bad:?}\n{}",
            self.show()
        );
    }

    /// A non-zero exit and exactly one `FAIL` line, which contains every one of `needles`.
    /// Returns that line.
    pub fn assert_one_fail(&self, needles: &[&str]) -> String {
        self.assert_no_panic();
        assert!(
            matches!(self.code, Some(c) if c != 0),
            "check should fail:\n{}",
            self.show()
        );
        let fails = self.with_label("FAIL");
        assert_eq!(
            fails.len(),
            1,
            "expected exactly one FAIL line:\n{}",
            self.show()
        );
        for needle in needles {
            assert!(
                fails[0].contains(needle),
                "the FAIL line should mention {needle:?}:\n{}",
                self.show()
            );
        }
        fails[0].to_owned()
    }

    pub fn has_line(&self, prefix: &str, needle: &str) -> bool {
        self.lines()
            .iter()
            .any(|l| l.starts_with(prefix) && l.contains(needle))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "status --json printed no JSON object ({e}):\n{}",
                self.show()
            )
        })
    }
    /// The `FAIL` lines.
    pub fn fails(&self) -> Vec<&str> {
        self.with_label("FAIL")
    }

    /// A non-zero exit and exactly one `FAIL` line; returns its message (without the label).
    pub fn one_failure(&self) -> String {
        self.assert_one_fail(&[])
            .trim_start_matches("FAIL")
            .trim_start()
            .to_owned()
    }
}

/// A config file in its own temp dir (kept alive by the returned guard).
pub fn write_config(text: &str) -> (TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("outbox-relay-cli-")
        .tempdir()
        .expect("create temp dir");
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, text).expect("write relay.toml");
    (dir, path)
}

/// Runs `outbox-relay <args> --config <path>` off the test's runtime thread.
pub async fn run_cli(args: &[&str], config_path: &std::path::Path) -> Out {
    let mut cmd = Command::new(relay_bin());
    cmd.args(args).arg("--config").arg(config_path);
    cmd.env("RUST_LOG", "warn");
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("run outbox-relay");
    let out = Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    // Shown by the test runner only for failing tests (or with --nocapture).
    eprintln!("$ outbox-relay {}\n{}", args.join(" "), out.show());
    out
}

/// Runs `outbox-relay <args> --config <config written to a temp file>`.
pub async fn cli(args: &[&str], config: &str) -> Out {
    let (_dir, path) = write_config(config);
    run_cli(args, &path).await
}
