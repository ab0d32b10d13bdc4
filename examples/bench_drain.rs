//! Measuring harness for `benches/bench.sh`: runs one command (the relay, `pg_recvlogical`,
//! the polling publisher) and prints one JSON line with how long it took and what it cost.
//!
//! ```text
//! bench_drain --pg-url postgres://postgres@127.0.0.1:5432/postgres --slot outbox_bench \
//!     --target-lsn 0/5A3B2C10 --log relay.log -- outbox-relay run --config relay.toml
//! ```
//!
//! Two ways to end a measurement:
//! - with `--target-lsn` (or `--trigger`): the command is a long-running relay; the run ends
//!   when the slot's `confirmed_flush_lsn` reaches the target. The command's CPU time and peak
//!   RSS are read from `/proc` just before it is stopped (SIGTERM).
//! - without: the run ends when the command exits (it must exit 0); its CPU time is read from
//!   `/proc/PID/stat` while it is a zombie, so it is complete.
//!
//! With `--trigger SQL-COMMAND`, the command is started first, the harness waits until it holds
//! the slot, then runs the shell command; the clock starts when that returns and the target is
//! the WAL position after it (`pg_current_wal_lsn()`). `--freeze-pid` SIGSTOPs a process (the
//! broker) right after the trigger for `--freeze-secs`.
//!
//! With `--records N` (and `--brokers`, `--topics`), the harness also watches the topics' end
//! offsets and notes when the first and when N more records than at the start are in them
//! (`first_secs`, `records_secs`, with the command's CPU time then, `first_cpu_s`,
//! `records_cpu_s`): for a publisher that confirms its slot only
//! now and then (Debezium: on offset flushes), when everything is in Kafka is not when the slot
//! moves. Without `--target-lsn` the run then ends there; with it, the run waits at most
//! `--slot-grace-secs` more for the slot (`slot_secs` null if it never got there).
//!
//! Output (one line): `{"secs": ..., "cpu_s": ..., "hwm_kb": ..., "walsender_cpu_s": ...,
//! "watch_cpu_s": [...], "machine_cpu_s": ..., "wall_s": ..., "pid": ...}`. `walsender_cpu_s` is the CPU time of the server process
//! streaming the slot (null when the server is not on this machine); `watch_cpu_s` is the CPU
//! each `--watch-pid` used during the run.

use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_postgres::{Client, NoTls};

#[derive(Parser)]
struct Args {
    /// The database (libpq URL) holding the slot.
    #[arg(long)]
    pg_url: String,
    /// The slot to watch; its walsender's CPU time is reported.
    #[arg(long)]
    slot: String,
    /// Stop when the slot's confirmed_flush_lsn reaches this LSN.
    #[arg(long)]
    target_lsn: Option<String>,
    /// Shell command to run once the command holds the slot; the clock starts after it.
    #[arg(long)]
    trigger: Option<String>,
    /// A process to SIGSTOP right after the trigger (the broker), for --freeze-secs.
    #[arg(long)]
    freeze_pid: Option<u32>,
    /// How long --freeze-pid stays stopped.
    #[arg(long, default_value_t = 5.0)]
    freeze_secs: f64,
    /// Other processes whose CPU time during the run is reported (e.g. the broker).
    #[arg(long)]
    watch_pid: Vec<u32>,
    /// Record a perf profile of the command into this file (perf record -F 999 -g).
    #[arg(long)]
    perf_out: Option<PathBuf>,
    /// Clock ticks per second of /proc/PID/stat (getconf CLK_TCK).
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
    /// Also note when this many new records are in --topics (their end offsets summed).
    #[arg(long, requires_all = ["brokers", "topics"])]
    records: Option<u64>,
    /// Bootstrap servers of --records.
    #[arg(long)]
    brokers: Option<String>,
    /// Topics of --records, comma-separated.
    #[arg(long, value_delimiter = ',')]
    topics: Vec<String>,
    /// With --records and --target-lsn: how long to wait for the slot once the records are in.
    #[arg(long, default_value_t = 120.0)]
    slot_grace_secs: f64,
    /// File receiving the command's stdout and stderr.
    #[arg(long)]
    log: Option<PathBuf>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// utime + stime in clock ticks and the state letter, from /proc/PID/stat.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Fields 14 and 15 of stat(5), counted from 3 here.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((state, utime + stime))
}

/// CPU time the whole machine spent busy (all CPUs, all processes), in clock ticks, from the
/// first line of /proc/stat: user, nice, system, irq, softirq, steal.
fn machine_ticks() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = text
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    Some(f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)? + f.get(7)?)
}

/// Peak resident set size (VmHWM) in KiB.
fn vm_hwm(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Context switches (voluntary, involuntary) summed over the process's live threads.
fn ctx_switches(pid: u32) -> (u64, u64) {
    let mut total = (0, 0);
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return total;
    };
    for task in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        for line in text.lines() {
            let value = |l: &str| -> u64 {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            if line.starts_with("voluntary_ctxt_switches:") {
                total.0 += value(line);
            } else if line.starts_with("nonvoluntary_ctxt_switches:") {
                total.1 += value(line);
            }
        }
    }
    total
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

/// The slot's state: whether confirmed_flush_lsn reached `target`, and the walsender's pid.
async fn slot_state(
    client: &Client,
    slot: &str,
    target: Option<&str>,
) -> anyhow::Result<(bool, Option<i32>)> {
    let row = client
        .query_opt(
            "SELECT coalesce(confirmed_flush_lsn >= $2::text::pg_lsn, false), active_pid \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot, &target.unwrap_or("0/0")],
        )
        .await?
        .ok_or_else(|| anyhow!("replication slot {slot} does not exist"))?;
    Ok((row.get(0), row.get(1)))
}

struct Walsender {
    pid: Option<u32>,
    /// CPU ticks at the last sample.
    ticks: u64,
    /// False when the server's processes are not visible here (a remote server).
    visible: bool,
}

impl Walsender {
    fn sample(&mut self, active_pid: Option<i32>) {
        if let Some(pid) = active_pid {
            let pid = pid as u32;
            if let Some((_, ticks)) = proc_stat(pid) {
                if self.pid != Some(pid) {
                    self.pid = Some(pid);
                }
                self.ticks = ticks;
                self.visible = true;
            }
        }
    }
}

/// The summed end offsets of some topics' partitions.
struct EndOffsets {
    consumer: BaseConsumer,
    partitions: Vec<(String, i32)>,
}

impl EndOffsets {
    fn new(brokers: &str, topics: &[String]) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .context("cannot create the Kafka client")?;
        let mut partitions = Vec::new();
        for topic in topics {
            let metadata = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .with_context(|| format!("no metadata for {topic}"))?;
            let n = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .map_or(0, |t| t.partitions().len() as i32);
            if n == 0 {
                bail!("topic {topic} has no partitions (create it first)");
            }
            partitions.extend((0..n).map(|p| (topic.clone(), p)));
        }
        Ok(Self {
            consumer,
            partitions,
        })
    }

    fn sum(&self) -> anyhow::Result<i64> {
        let mut total = 0;
        for (topic, p) in &self.partitions {
            let (_, high) = self
                .consumer
                .fetch_watermarks(topic, *p, Duration::from_secs(10))
                .with_context(|| format!("cannot read the end of {topic}[{p}]"))?;
            total += high;
        }
        Ok(total)
    }
}

/// What `--records` observed: when the first record and when all were in, and the command's
/// CPU ticks then.
#[derive(Default)]
struct RecordsSeen {
    first: Option<(f64, u64)>,
    at: Option<(f64, u64)>,
    slot_reached: bool,
}

/// A `perf record` of the command, started once the command streams from the slot (all its
/// threads exist by then; attaching during exec misses some of them).
struct Perf {
    out: Option<PathBuf>,
    child: Option<Child>,
}

impl Perf {
    fn start(&mut self, pid: u32) -> anyhow::Result<()> {
        let Some(out) = &self.out else {
            return Ok(());
        };
        if self.child.is_some() {
            return Ok(());
        }
        let child = Command::new("perf")
            .args([
                "record",
                "-q",
                "-F",
                "999",
                "-g",
                "-p",
                &pid.to_string(),
                "-o",
            ])
            .arg(out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start perf")?;
        self.child = Some(child);
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "INT");
            let _ = child.wait();
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench_drain: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> anyhow::Result<String> {
    let (client, connection) = tokio_postgres::connect(&args.pg_url, NoTls)
        .await
        .context("cannot connect to PostgreSQL")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let watch_before: Vec<Option<u64>> = args
        .watch_pid
        .iter()
        .map(|&p| proc_stat(p).map(|s| s.1))
        .collect();

    let (stdout, stderr) = match &args.log {
        Some(path) => {
            let f = std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            (Stdio::from(f.try_clone()?), Stdio::from(f))
        }
        None => (Stdio::null(), Stdio::inherit()),
    };
    let end_offsets = match (args.records, &args.brokers) {
        (Some(_), Some(brokers)) => {
            let w = EndOffsets::new(brokers, &args.topics)?;
            let base = w.sum()?;
            Some((w, base))
        }
        _ => None,
    };
    let mut seen = RecordsSeen::default();
    let machine_before = machine_ticks();
    let wall_start = Instant::now();
    let mut child = Command::new(&args.command[0])
        .args(&args.command[1..])
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("cannot start {}", args.command[0]))?;
    let pid = child.id();
    let mut perf = Perf {
        out: args.perf_out.clone(),
        child: None,
    };
    let deadline = wall_start + Duration::from_secs(args.timeout_secs);
    let mut probes = Probes {
        walsender: Walsender {
            pid: None,
            ticks: 0,
            visible: false,
        },
        perf: &mut perf,
        end_offsets: end_offsets.as_ref(),
        seen: &mut seen,
    };
    let outcome = measure(args, &client, &mut child, wall_start, deadline, &mut probes).await;
    let walsender = probes.walsender;
    let confirmed: Option<String> = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&args.slot],
        )
        .await
        .ok()
        .flatten()
        .and_then(|r| r.get(0));
    let (machine_after, wall) = (machine_ticks(), wall_start.elapsed().as_secs_f64());
    // Only meaningful while the command still runs (the relay): a reaped one reads as 0.
    let (voluntary, involuntary) = ctx_switches(pid);
    // What was measured (e.g. `java`, not a shell that started it).
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map_or("null".into(), |c| format!("\"{}\"", c.trim()));
    perf.stop();
    // Stop the command if it still runs (the relay, or anything after an error).
    if child.try_wait().ok().flatten().is_none() {
        signal(pid, "TERM");
        let stop_deadline = Instant::now() + Duration::from_secs(15);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < stop_deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if child.try_wait().ok().flatten().is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    let (secs, ticks, hwm) = outcome?;

    let tck = args.clk_tck as f64;
    let watch: Vec<String> = args
        .watch_pid
        .iter()
        .zip(&watch_before)
        .map(|(&p, before)| match (before, proc_stat(p)) {
            (Some(b), Some((_, now))) => format!("{:.2}", (now.saturating_sub(*b)) as f64 / tck),
            _ => "null".into(),
        })
        .collect();
    let walsender_cpu = if walsender.visible {
        format!("{:.2}", walsender.ticks as f64 / tck)
    } else {
        "null".into()
    };
    // Measured from the command's start to the end of the run (a trigger included).
    let machine = match (machine_before, machine_after) {
        (Some(a), Some(b)) => format!("{:.2}", b.saturating_sub(a) as f64 / tck),
        _ => "null".into(),
    };
    let records = match (args.records, seen.at) {
        (None, _) => String::new(),
        (Some(_), Some((rs, rt))) => format!(
            ", \"first_secs\": {:.3}, \"first_cpu_s\": {:.2}, \"records_secs\": {rs:.3}, \
             \"records_cpu_s\": {:.2}, \"slot_secs\": {}",
            seen.first.map_or(rs, |f| f.0),
            seen.first.map_or(rt, |f| f.1) as f64 / tck,
            rt as f64 / tck,
            if seen.slot_reached {
                format!("{secs:.3}")
            } else {
                "null".into()
            }
        ),
        (Some(_), None) => ", \"records_secs\": null".into(),
    };
    let confirmed = confirmed.map_or("null".into(), |c| format!("\"{c}\""));
    Ok(format!(
        "{{\"secs\": {secs:.3}, \"confirmed_lsn\": {confirmed}{records}, \"cpu_s\": {:.2}, \"hwm_kb\": {}, \"walsender_cpu_s\": {walsender_cpu}, \"watch_cpu_s\": [{}], \"machine_cpu_s\": {machine}, \"wall_s\": {:.3}, \"ctx_voluntary\": {voluntary}, \"ctx_involuntary\": {involuntary}, \"comm\": {comm}, \"pid\": {pid}}}",
        ticks as f64 / tck,
        hwm.map_or("null".into(), |h| h.to_string()),
        watch.join(", "),
        wall
    ))
}

/// What is sampled along the way.
struct Probes<'a> {
    walsender: Walsender,
    perf: &'a mut Perf,
    /// --records: the end offsets to watch and their sum at the start.
    end_offsets: Option<&'a (EndOffsets, i64)>,
    seen: &'a mut RecordsSeen,
}

/// Runs the measurement proper; returns (seconds, CPU ticks, peak RSS KiB).
async fn measure(
    args: &Args,
    client: &Client,
    child: &mut Child,
    wall_start: Instant,
    deadline: Instant,
    probes: &mut Probes<'_>,
) -> anyhow::Result<(f64, u64, Option<u64>)> {
    let pid = child.id();
    let tick = Duration::from_millis(10);
    let mut hwm = None;
    let mut target = args.target_lsn.clone();
    let mut start = wall_start;
    let mut thaw_at = None;

    if let Some(trigger) = &args.trigger {
        // Wait until the command streams from the slot, then give it a moment to settle.
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("{} exited before streaming ({status})", args.command[0]);
            }
            if Instant::now() > deadline {
                bail!("{} did not take the slot in time", args.command[0]);
            }
            let (_, active) = slot_state(client, &args.slot, None).await?;
            if active.is_some() {
                break;
            }
            tokio::time::sleep(tick).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Blocking is fine: nothing else needs the runtime meanwhile.
        let status = Command::new("sh").args(["-c", trigger]).status()?;
        if !status.success() {
            bail!("trigger command failed ({status})");
        }
        start = Instant::now();
        if let Some(p) = args.freeze_pid {
            signal(p, "STOP");
            thaw_at = Some((p, start + Duration::from_secs_f64(args.freeze_secs)));
        }
        let lsn: String = client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?
            .get(0);
        target = Some(lsn);
    }

    loop {
        if let Some((p, at)) = thaw_at {
            if Instant::now() >= at {
                signal(p, "CONT");
                thaw_at = None;
            }
        }
        let (reached, active) = slot_state(client, &args.slot, target.as_deref()).await?;
        probes.walsender.sample(active);
        if active.is_some() {
            probes.perf.start(pid)?;
        }
        if let Some(h) = vm_hwm(pid) {
            hwm = Some(h);
        }
        if let (Some((w, base)), Some(need), None) =
            (probes.end_offsets, args.records, probes.seen.at)
        {
            let new = w.sum()? - base;
            if new >= 1 && probes.seen.first.is_none() {
                let (_, ticks) = proc_stat(pid).ok_or_else(|| anyhow!("command vanished"))?;
                probes.seen.first = Some((start.elapsed().as_secs_f64(), ticks));
            }
            if new >= need as i64 {
                let (_, ticks) = proc_stat(pid).ok_or_else(|| anyhow!("command vanished"))?;
                probes.seen.at = Some((start.elapsed().as_secs_f64(), ticks));
            }
        }
        let records_in = probes.end_offsets.is_none() || probes.seen.at.is_some();
        if target.is_none() && probes.end_offsets.is_some() {
            // --records without a target: the run ends when they are in.
            if let Some((secs, ticks)) = probes.seen.at {
                return Ok((secs, ticks, vm_hwm(pid).or(hwm)));
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{} exited before the records were in ({status})",
                    args.command[0]
                );
            }
        }
        match &target {
            Some(_) if reached && records_in => {
                probes.seen.slot_reached = true;
                let secs = start.elapsed().as_secs_f64();
                let (_, ticks) = proc_stat(pid).ok_or_else(|| anyhow!("command vanished"))?;
                let hwm = vm_hwm(pid).or(hwm);
                if let Some((p, _)) = thaw_at {
                    signal(p, "CONT");
                }
                return Ok((secs, ticks, hwm));
            }
            Some(_) => {
                if let Some(status) = child.try_wait()? {
                    bail!("{} exited before the target ({status})", args.command[0]);
                }
                if let Some((at, _)) = probes.seen.at {
                    if start.elapsed().as_secs_f64() > at + args.slot_grace_secs {
                        // The records are in but the slot never got there: report without it.
                        let (_, ticks) =
                            proc_stat(pid).ok_or_else(|| anyhow!("command vanished"))?;
                        return Ok((start.elapsed().as_secs_f64(), ticks, vm_hwm(pid).or(hwm)));
                    }
                }
            }
            None if probes.end_offsets.is_some() => {}
            None => {
                // Read the final CPU time while the process is a zombie, then reap it.
                if let Some(('Z', ticks)) = proc_stat(pid) {
                    let secs = start.elapsed().as_secs_f64();
                    let status = child.wait()?;
                    if !status.success() {
                        bail!("{} failed ({status})", args.command[0]);
                    }
                    return Ok((secs, ticks, hwm));
                }
            }
        }
        if Instant::now() > deadline {
            if let Some((p, _)) = thaw_at {
                signal(p, "CONT");
            }
            bail!("timed out after {} s", args.timeout_secs);
        }
        tokio::time::sleep(tick).await;
    }
}
