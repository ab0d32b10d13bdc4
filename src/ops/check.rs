//! `outbox-relay check`: read-only checks that a configuration, its PostgreSQL and its Kafka
//! are ready for the relay, reported one line per check. Nothing is created or altered, so it
//! is safe to run from a container's init step or CI against production.
//!
//! Checks are independent: a failure skips only the checks that cannot run without what
//! failed (no database connection → no database checks, but the broker is still checked), so
//! one run shows every problem and each root cause yields one `FAIL` line.

use std::fmt;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, Producer, ProducerContext};
use rdkafka::ClientContext;
use tokio_postgres::Client;

use crate::config::topic::Template;
use crate::config::{Config, ConfigError, KafkaConfig, OutboxConfig, PostgresConfig};
use crate::pipeline::setup::{self, SetupError};
use crate::postgres::catalog::{
    self, Publication, ServerProblem, SlotMarker, SlotRoom, SlotVerdict,
};
use crate::postgres::connect::PgEndpoint;
use crate::postgres::errors::{pg_message, Cause, PgError};
use crate::postgres::ha;
use crate::postgres::replication::ReplicationConnection;

/// How long to wait for PostgreSQL to accept a connection before calling it unreachable.
pub const PG_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for broker metadata unless `[kafka.properties] socket.timeout.ms` says.
pub const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The check passed.
    Ok,
    /// The check failed: the relay would not start or would not work.
    Fail,
    /// The check could not run because an earlier one failed.
    Skip,
    /// Information only, never a failure.
    Info,
    /// The relay would run, but something a careful operator wants is missing (the lost-slot
    /// guard, a high-availability setting); never a failure.
    Warn,
}

impl Verdict {
    /// The label printed at the start of the line.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "skip",
            Verdict::Info => "info",
            Verdict::Warn => "WARN",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct CheckLine {
    /// Whether it passed.
    pub verdict: Verdict,
    /// What was checked and what was found; for failures, the cause and the fix.
    pub message: String,
}

impl fmt::Display for CheckLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Fixed-width labels keep the messages aligned for people and easy to cut for scripts.
        // Messages come from servers too; a stray newline must not break "one line per check".
        write!(
            f,
            "{:<6}{}",
            self.verdict.label(),
            self.message.replace(['\r', '\n'], " ")
        )
    }
}

/// Collects verdicts and hands each line to the caller as soon as it is known, so a slow
/// check (a broker timeout) does not hide the lines before it.
struct Report<'a> {
    emit: &'a mut dyn FnMut(&CheckLine),
    failures: usize,
}

impl Report<'_> {
    fn line(&mut self, verdict: Verdict, message: String) {
        if verdict == Verdict::Fail {
            self.failures += 1;
        }
        (self.emit)(&CheckLine { verdict, message });
    }
    fn ok(&mut self, message: String) {
        self.line(Verdict::Ok, message)
    }
    fn fail(&mut self, message: String) {
        self.line(Verdict::Fail, message)
    }
    fn skip(&mut self, message: String) {
        self.line(Verdict::Skip, message)
    }
    fn info(&mut self, message: String) {
        self.line(Verdict::Info, message)
    }
    fn warn(&mut self, message: String) {
        self.line(Verdict::Warn, message)
    }
}

/// Runs every check for the config file at `path`, passing each line to `emit` as it is
/// decided; returns whether all passed (no `FAIL` line).
pub async fn run(path: &Path, emit: &mut dyn FnMut(&CheckLine)) -> bool {
    let mut report = Report { emit, failures: 0 };
    let config = match Config::load(path) {
        Ok(config) => {
            report.ok(format!(
                "config {} parses: {} outbox table(s), {} [[message]] prefix(es), slot {}, publication {}",
                path.display(),
                config.outbox.len(),
                config.message.len(),
                config.postgres.slot,
                config.postgres.publication
            ));
            config
        }
        Err(e) => {
            report.fail(e.to_string());
            report.skip("PostgreSQL and Kafka checks: they need a valid config".into());
            return false;
        }
    };
    match PgEndpoint::new(&config.postgres) {
        Ok(endpoint) => postgres_checks(&mut report, &config, &endpoint).await,
        Err(e) => {
            let message = match e {
                // PgEndpoint labels its errors "[postgres]" in place of a path; name the file.
                ConfigError::Invalid { message, .. } => {
                    format!("config file {}: [postgres] {message}", path.display())
                }
                other => other.to_string(),
            };
            report.fail(message);
            report.skip("PostgreSQL checks: [postgres] url must be usable first".into());
        }
    }
    let destinations: Vec<(String, &str)> = config
        .outbox
        .iter()
        .map(|o| (o.table.to_string(), o.topic.as_str()))
        .chain(config.message.iter().map(|m| {
            (
                format!("[[message]] prefix {:?}", m.prefix),
                m.topic.as_str(),
            )
        }))
        .collect();
    kafka_checks(&mut report, &config.kafka, &destinations).await;
    report.failures == 0
}

/// `user@host:port/dbname` from the parsed URL: names the target without any password, also
/// for key=value connection strings, which [`crate::postgres::connect::redact`] leaves as they are.
pub fn describe_target(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match host {
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(dir) => format!("{}/.s.PGSQL.{port}", dir.display()),
            }
        })
        .collect();
    let hosts = if hosts.is_empty() {
        "(no host)".to_owned()
    } else {
        hosts.join(",")
    };
    let user = config.get_user().unwrap_or("?");
    let db = config.get_dbname().unwrap_or(user);
    format!("{user}@{hosts}/{db}")
}

/// What to do about a failed connection: by what the failure means ([`PgError`]'s one
/// classification), made precise for the SQLSTATEs with a known fix.
fn connect_fix(e: &tokio_postgres::Error) -> &'static str {
    let failure = PgError::from(e);
    match (failure.cause, failure.sqlstate.as_deref()) {
        (_, Some("28P01")) => "check the user and password in [postgres] url (or password_file)",
        (Cause::Credentials, _) => "check the user in [postgres] url and that pg_hba.conf lets it connect from this host",
        (_, Some("3D000")) => "fix the database name in [postgres] url",
        (_, Some("53300")) => "the server has no free connection slots: raise max_connections or close idle sessions",
        (_, Some("57P03")) => "the server is starting up or shutting down: retry when it is up",
        (Cause::Unavailable, _) => "the server is not accepting work right now: retry when it is up",
        (Cause::Connection, _) if e.to_string().contains("password missing") => {
            "the server asks for a password: put it in [postgres] url or set password_file"
        }
        (Cause::Connection, _) => "check that PostgreSQL runs and listens on that host and port (listen_addresses, firewall) and that [postgres] url names them",
        _ => "fix the cause the server names, then retry",
    }
}

/// The relay's role as `pg_roles` sees it.
struct Role {
    name: String,
    superuser: bool,
    /// The REPLICATION attribute, superuser, or membership in RDS' `rds_replication`.
    can_replicate: bool,
}

/// A configured table that exists, with what the role may do with it.
struct TableAccess {
    exists: bool,
    owned: bool,
}

async fn postgres_checks(report: &mut Report<'_>, config: &Config, endpoint: &PgEndpoint) {
    let target = describe_target(endpoint.config());
    let client = match tokio::time::timeout(PG_TIMEOUT, endpoint.connect_sql()).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => {
            report.fail(format!(
                "cannot connect to PostgreSQL at {target}: {}; {}",
                pg_message(&e),
                connect_fix(&e)
            ));
            report.skip("database checks: no connection to PostgreSQL".into());
            return;
        }
        Err(_) => {
            report.fail(format!(
                "cannot connect to PostgreSQL at {target}: no answer within {}s; check the host and port in [postgres] url and that no firewall drops the connection",
                PG_TIMEOUT.as_secs()
            ));
            report.skip("database checks: no connection to PostgreSQL".into());
            return;
        }
    };
    let version = client
        .query_one("SHOW server_version", &[])
        .await
        .ok()
        .and_then(|row| row.try_get::<_, String>(0).ok())
        .unwrap_or_else(|| "?".into());
    report.ok(format!(
        "PostgreSQL reachable at {target} (server {version})"
    ));

    let server = catalog::server(&client).await;
    match &server {
        Ok(state) => {
            let problems = state.problems();
            if !problems
                .iter()
                .any(|p| matches!(p, ServerProblem::WalLevel(_)))
            {
                report.ok("wal_level = logical".into());
            }
            for problem in problems {
                report.fail(problem.to_string());
            }
            if let Err(problem) =
                catalog::failover_wanted(config.postgres.failover(), state.version_num)
            {
                report.fail(problem.to_string());
            }
        }
        Err(e) => report.fail(format!(
            "cannot read wal_level and pg_is_in_recovery(): {e}; fix the cause and retry"
        )),
    }
    let version_num = server.as_ref().ok().map(|s| s.version_num);
    if !config.message.is_empty() {
        let major = version
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|m| m.parse::<u32>().ok());
        match major {
            Some(m) if m < 14 => report.fail(format!(
                "[[message]] needs PostgreSQL 14 or later (pgoutput's messages option); server {version} would refuse it: upgrade, or relay an outbox table instead"
            )),
            _ => report.ok(format!(
                "server {version} sends logical decoding messages for [[message]] prefixes"
            )),
        }
    }

    let role = check_role(report, &client).await;
    // Unknown attributes (the query failed): try, the connection attempt says more.
    if role.as_ref().is_none_or(|r| r.can_replicate) {
        check_replication_connection(report, endpoint, &target).await;
    } else {
        report.skip("replication connection: the role lacks REPLICATION (see above)".into());
    }

    let mut tables = Vec::with_capacity(config.outbox.len());
    for table in &config.outbox {
        let exists = match setup::check_table(&client, table).await {
            Ok(()) => {
                report.ok(format!(
                    "outbox table {} has columns {}",
                    table.table,
                    table.required_columns().join(", ")
                ));
                true
            }
            Err(
                e @ (SetupError::MissingColumn { .. }
                | SetupError::EnvelopeNullability { .. }
                | SetupError::EnvelopeType(_)),
            ) => {
                report.fail(e.to_string());
                true
            }
            Err(e) => {
                report.fail(e.to_string());
                false
            }
        };
        let owned = if exists {
            check_select(report, &client, table, role.as_ref()).await
        } else {
            report.skip(format!(
                "SELECT privilege on {}: the table is missing",
                table.table
            ));
            false
        };
        tables.push(TableAccess { exists, owned });
    }

    check_publication(report, &client, config, role.as_ref(), &tables).await;
    // Read before the slot, as `run` does: a record of its creation then predates the reading.
    let guard =
        catalog::read_guard(&client, &config.postgres.slot, &config.postgres.publication).await;
    let marker = guard.as_ref().ok().and_then(|g| g.marker.as_ref());
    check_slot(
        report,
        &client,
        &config.postgres,
        marker,
        role.as_ref(),
        version_num,
    )
    .await;
    check_guard(report, &config.postgres, guard);
    check_ha(report, &config.postgres, endpoint, &client).await;
}

/// One `(host:port, url)` per host of a multi-host `[postgres] url` (libpq's
/// `postgres://h1:5432,h2:5432/app` or `host=h1,h2 port=5432,5433`), each url naming only that
/// host; empty for a single host. Unix-socket hosts are left out (a standby is elsewhere).
fn per_host_urls(url: &str, config: &tokio_postgres::Config) -> Vec<(String, String)> {
    use tokio_postgres::config::Host;
    let (hosts, ports) = (config.get_hosts(), config.get_ports());
    if hosts.len() < 2 {
        return Vec::new();
    }
    let scheme = ["postgres://", "postgresql://"]
        .into_iter()
        .find(|s| url.starts_with(s));
    hosts
        .iter()
        .enumerate()
        .filter_map(|(i, host)| {
            let Host::Tcp(name) = host else { return None };
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            let single = match scheme {
                Some(scheme) => {
                    let rest = &url[scheme.len()..];
                    let (authority, tail) =
                        rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
                    let userinfo = authority.rfind('@').map_or("", |at| &authority[..=at]);
                    let host = if name.contains(':') {
                        format!("[{name}]")
                    } else {
                        name.clone()
                    };
                    format!("{scheme}{userinfo}{host}:{port}{tail}")
                }
                None => {
                    let kept: Vec<&str> = url
                        .split_whitespace()
                        .filter(|kv| {
                            !["host=", "hostaddr=", "port="]
                                .iter()
                                .any(|k| kv.starts_with(k))
                        })
                        .collect();
                    format!("{} host={name} port={port}", kept.join(" "))
                }
            };
            Some((format!("{name}:{port}"), single))
        })
        .collect()
}

/// Reads the high-availability settings of the server at `url`.
async fn read_ha_at(pg: &PostgresConfig, url: String) -> Result<ha::HaReading, String> {
    let single = PostgresConfig { url, ..pg.clone() };
    let endpoint = PgEndpoint::new(&single).map_err(|e| e.to_string())?;
    let client = match tokio::time::timeout(PG_TIMEOUT, endpoint.connect_sql()).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => return Err(pg_message(&e)),
        Err(_) => return Err(format!("no answer within {}s", PG_TIMEOUT.as_secs())),
    };
    ha::read(&client).await.map_err(|e| e.to_string())
}

/// Whether the relay's slot would survive a failover: the primary's and, when `[postgres]
/// url` lists them, each standby's settings, by [`ha`]'s rules. Warnings only: a server
/// without standbys runs the relay fine.
async fn check_ha(
    report: &mut Report<'_>,
    pg: &PostgresConfig,
    endpoint: &PgEndpoint,
    client: &Client,
) {
    let hosts = per_host_urls(&pg.url, endpoint.config());
    let mut primary = None;
    let mut standbys = Vec::new();
    if hosts.is_empty() {
        match ha::read(client).await {
            Ok(reading) if !reading.in_recovery => primary = Some(reading),
            // A standby: already a FAIL above.
            Ok(_) => return,
            Err(e) => {
                return report.warn(format!(
                    "cannot read the high-availability settings (synchronized_standby_slots and others): {e}; failover readiness was not checked"
                ))
            }
        }
    } else {
        for (host, url) in &hosts {
            match read_ha_at(pg, url.clone()).await {
                Ok(reading) if reading.in_recovery => standbys.push((host.clone(), reading)),
                Ok(reading) if primary.is_none() => primary = Some(reading),
                Ok(_) => report.warn(format!(
                    "{host} in [postgres] url is a primary too (not in recovery); only the first primary's settings were checked"
                )),
                Err(e) => report.warn(format!(
                    "cannot reach {host} of [postgres] url to check its high-availability settings: {e}"
                )),
            }
        }
    }
    let Some(primary) = primary else {
        return report.warn(
            "high-availability settings not checked: no host of [postgres] url is a reachable primary".into(),
        );
    };
    if let Some(line) = ha::too_old(&primary) {
        return report.info(line);
    }
    let warnings = ha::primary_warnings(&primary);
    if warnings.is_empty() {
        report.ok(format!(
            "synchronized_standby_slots = {} on the primary",
            primary.standby_slots().join(", ")
        ));
    }
    for warning in warnings {
        report.warn(warning.to_string());
    }
    if standbys.is_empty() {
        report.info(if hosts.is_empty() {
            "standby settings not checked: [postgres] url names one host; list the standbys after the primary (postgres://primary:5432,standby:5432/app, or host=primary,standby) so that check judges their sync_replication_slots, hot_standby_feedback and primary_slot_name".into()
        } else {
            "no standby among the reachable hosts of [postgres] url: standby settings not checked".into()
        });
    }
    for (host, standby) in &standbys {
        let warnings = ha::standby_warnings(host, standby, &primary);
        if warnings.is_empty() {
            report.ok(format!(
                "standby {host} synchronises slots (sync_replication_slots = on, hot_standby_feedback = on, primary_slot_name = {}, listed in synchronized_standby_slots)",
                standby.primary_slot_name
            ));
        }
        for warning in warnings {
            report.warn(warning.to_string());
        }
    }
}

/// Whether the relay can record the slot's creation, so that a slot lost in a failover is
/// refused at start instead of silently replaced (see [`catalog::Guard::armed`]).
fn check_guard(
    report: &mut Report<'_>,
    pg: &PostgresConfig,
    guard: Result<catalog::Guard, PgError>,
) {
    let (slot, publication) = (&pg.slot, &pg.publication);
    let guard = match guard {
        Ok(guard) => guard,
        Err(e) => {
            return report.fail(format!(
                "cannot read where the relay records the creation of slot {slot} ({} or publication {publication}'s comment): {e}; fix the cause and retry",
                catalog::MARKER_TABLE
            ))
        }
    };
    match guard.armed(slot, publication) {
        Ok(catalog::GuardArmed::Table) => report.ok(format!(
            "lost-slot guard armed: the relay records the creation of slot {slot} in {}, so a slot lost in a failover is refused at start, not silently replaced",
            catalog::MARKER_TABLE
        )),
        Ok(catalog::GuardArmed::Publication) => report.ok(format!(
            "lost-slot guard armed: the relay records the creation of slot {slot} as the comment of publication {publication}, which role {} {} (without that ownership, migrations/002_relay_role.sql's {} keeps the record)",
            guard.role,
            if guard.owns_publication.is_some() { "owns" } else { "will own once it creates it" },
            catalog::MARKER_TABLE
        )),
        Err(off) => report.warn(off.to_string()),
    }
}

async fn check_role(report: &mut Report<'_>, client: &Client) -> Option<Role> {
    let row = client
        .query_one(
            "SELECT r.rolname::text, r.rolsuper, r.rolreplication, \
                    EXISTS (SELECT 1 FROM pg_roles g WHERE g.rolname = 'rds_replication' \
                            AND pg_has_role(current_user, g.oid, 'MEMBER')) \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await;
    let parsed = row.and_then(|row| {
        Ok(Role {
            name: row.try_get(0)?,
            superuser: row.try_get(1)?,
            can_replicate: row.try_get::<_, bool>(1)?
                || row.try_get::<_, bool>(2)?
                || row.try_get::<_, bool>(3)?,
        })
    });
    match parsed {
        Ok(role) => {
            if role.superuser {
                report.ok(format!("role {} may replicate (superuser)", role.name));
            } else if role.can_replicate {
                report.ok(format!("role {} has REPLICATION", role.name));
            } else {
                report.fail(format!(
                    "role {0} lacks the REPLICATION attribute, which the replication connection and the slot need; run ALTER ROLE {0} REPLICATION as a superuser (on Amazon RDS: GRANT rds_replication TO {0})",
                    role.name
                ));
            }
            Some(role)
        }
        Err(e) => {
            report.fail(format!(
                "cannot read the role's attributes from pg_roles: {}; fix the cause and retry",
                pg_message(&e)
            ));
            None
        }
    }
}

async fn check_replication_connection(
    report: &mut Report<'_>,
    endpoint: &PgEndpoint,
    target: &str,
) {
    let attempt = tokio::time::timeout(PG_TIMEOUT, async {
        let mut conn = ReplicationConnection::connect(endpoint).await?;
        // Dropping the connection afterwards closes the socket; it never started streaming.
        conn.identify_system().await
    })
    .await;
    match attempt {
        Ok(Ok(system)) => report.ok(format!(
            "replication connection opens (system {}, timeline {}, WAL at {})",
            system.system_id, system.timeline, system.xlog_pos
        )),
        Ok(Err(e)) => {
            let e = PgError::from(e);
            let fix = match (e.cause, e.sqlstate.as_deref()) {
                (Cause::Credentials, _) => "pg_hba.conf must let the role connect to the database; a replication=database connection matches ordinary database lines",
                (Cause::Privilege, _) => "the role needs REPLICATION: ALTER ROLE <role> REPLICATION",
                (_, Some("53300")) => "all max_wal_senders are in use: raise max_wal_senders (restart) or stop another replication client",
                (Cause::Connection, _) => "check that PostgreSQL accepts connections on that host and port",
                _ => "fix the cause PostgreSQL names, then retry",
            };
            report.fail(format!(
                "cannot open a replication connection to {target}: {e}; {fix}"
            ));
        }
        Err(_) => report.fail(format!(
            "cannot open a replication connection to {target}: no answer within {}s; check the host and port in [postgres] url",
            PG_TIMEOUT.as_secs()
        )),
    }
}

/// Checks SELECT on the table (and USAGE on its schema); returns whether the role owns it.
async fn check_select(
    report: &mut Report<'_>,
    client: &Client,
    table: &OutboxConfig,
    role: Option<&Role>,
) -> bool {
    let (schema, name) = table.schema_and_name();
    let row = client
        .query_one(
            "SELECT has_schema_privilege(n.oid, 'USAGE'), has_table_privilege(c.oid, 'SELECT'), \
                    pg_has_role(c.relowner, 'USAGE') \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &name],
        )
        .await
        .and_then(|row| {
            Ok((
                row.try_get::<_, bool>(0)?,
                row.try_get::<_, bool>(1)?,
                row.try_get::<_, bool>(2)?,
            ))
        });
    let who = role.map_or("the relay's role", |r| r.name.as_str());
    match row {
        Ok((true, true, owned)) => {
            report.ok(format!("role {who} may SELECT from {}", table.table));
            owned
        }
        Ok((usage, _, owned)) => {
            let grant = if usage {
                format!("GRANT SELECT ON {} TO {who}", table.table)
            } else {
                format!(
                    "GRANT USAGE ON SCHEMA {schema} TO {who}; GRANT SELECT ON {} TO {who}",
                    table.table
                )
            };
            report.fail(format!(
                "role {who} may not SELECT from {}; run {grant}",
                table.table
            ));
            owned
        }
        Err(e) => {
            report.fail(format!(
                "cannot check privileges on {}: {}; fix the cause and retry",
                table.table,
                pg_message(&e)
            ));
            false
        }
    }
}

/// Checks the publication by the rules `run` applies; returns it when it exists.
async fn check_publication(
    report: &mut Report<'_>,
    client: &Client,
    config: &Config,
    role: Option<&Role>,
    tables: &[TableAccess],
) -> Option<Publication> {
    let name = &config.postgres.publication;
    let publication = match catalog::read_publication(client, name).await {
        Ok(Some(publication)) => publication,
        Ok(None) => {
            publication_absent(report, client, config, role, tables).await;
            return None;
        }
        Err(e) => {
            report.fail(format!(
                "cannot read publication {name}: {e}; fix the cause and retry"
            ));
            return None;
        }
    };
    // A missing table already failed above; the publication cannot cover it either.
    let existing: Vec<&OutboxConfig> = config
        .outbox
        .iter()
        .zip(tables)
        .filter(|(_, access)| access.exists)
        .map(|(table, _)| table)
        .collect();
    let judged = match catalog::outbox_tables(client, &existing).await {
        Ok(judged) => judged,
        Err(e) => {
            report.fail(format!(
                "cannot read the tables of publication {name}: {e}; fix the cause and retry"
            ));
            return Some(publication);
        }
    };
    let problems = catalog::publication_problems(name, &publication, &judged);
    if problems.is_empty() && !existing.is_empty() {
        let names: Vec<&str> = existing.iter().map(|t| t.table.as_str()).collect();
        report.ok(format!(
            "publication {name} publishes inserts of {}",
            names.join(", ")
        ));
    }
    for problem in problems {
        report.fail(problem.to_string());
    }
    Some(publication)
}

async fn publication_absent(
    report: &mut Report<'_>,
    client: &Client,
    config: &Config,
    role: Option<&Role>,
    tables: &[TableAccess],
) {
    let publication = &config.postgres.publication;
    let list = config
        .outbox
        .iter()
        .map(|t| t.table.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if tables.iter().any(|t| !t.exists) {
        report.skip(format!(
            "publication {publication} does not exist; the relay would create it at start, once every outbox table exists"
        ));
        return;
    }
    let Some(role) = role else {
        report.skip(format!(
            "publication {publication} does not exist; whether the role may create it is unknown (see above)"
        ));
        return;
    };
    let how = catalog::create_publication_sql(publication, &list);
    if role.superuser {
        report.ok(format!(
            "publication {publication} does not exist; the relay will create it at start ({how}; role {} is a superuser)",
            role.name
        ));
        return;
    }
    // CREATE PUBLICATION needs CREATE on the database, and adding a table needs its ownership.
    let may_create_in_db = client
        .query_one(
            "SELECT has_database_privilege(current_database(), 'CREATE')",
            &[],
        )
        .await
        .and_then(|row| row.try_get::<_, bool>(0));
    let may_create_in_db = match may_create_in_db {
        Ok(b) => b,
        Err(e) => {
            report.fail(format!(
                "cannot check the CREATE privilege on the database: {}; fix the cause and retry",
                pg_message(&e)
            ));
            return;
        }
    };
    let not_owned: Vec<&str> = config
        .outbox
        .iter()
        .zip(tables)
        .filter(|(_, a)| !a.owned)
        .map(|(t, _)| t.table.as_str())
        .collect();
    if may_create_in_db && not_owned.is_empty() {
        report.ok(format!(
            "publication {publication} does not exist; the relay will create it at start ({how}; role {} owns the tables)",
            role.name
        ));
        return;
    }
    let mut why = Vec::new();
    if !not_owned.is_empty() {
        why.push(format!("does not own {}", not_owned.join(", ")));
    }
    if !may_create_in_db {
        why.push("has no CREATE privilege on the database".to_owned());
    }
    report.fail(format!(
        "publication {publication} does not exist and role {} cannot create it ({}); create it as the tables' owner: {how}",
        role.name,
        why.join(", ")
    ));
}

/// Checks the slot by the rules `run` applies; `marker` (the record of its creation) tells a
/// slot that never existed from one that vanished.
async fn check_slot(
    report: &mut Report<'_>,
    client: &Client,
    pg: &PostgresConfig,
    marker: Option<&SlotMarker>,
    role: Option<&Role>,
    version_num: Option<i32>,
) {
    let name = pg.slot.as_str();
    let reading = match catalog::read_slot(client, name).await {
        Ok(reading) => reading,
        Err(e) => {
            report.fail(format!(
                "cannot read replication slot {name} from pg_replication_slots: {e}; fix the cause and retry"
            ));
            return;
        }
    };
    let slot = match (catalog::slot_verdict(&reading, marker, pg), &reading.slot) {
        (SlotVerdict::Unusable(problem), _) => return report.fail(problem.to_string()),
        (SlotVerdict::Usable(_) | SlotVerdict::Creating, Some(slot)) => slot,
        (SlotVerdict::Missing, _) | (_, None) => {
            return slot_absent(report, client, pg, role).await;
        }
    };
    if let Some(warning) = slot.at_risk(name) {
        report.info(warning);
    }
    let activity = match (slot.active, slot.active_pid) {
        (true, Some(pid)) => format!("in use by pid {pid}"),
        (true, None) => "in use".to_owned(),
        (false, _) => "not in use".to_owned(),
    };
    report.ok(format!(
        "replication slot {name}: pgoutput in database {}, wal_status {}, confirmed {}, {activity}",
        reading.current_database,
        slot.wal_status.as_deref().unwrap_or("(none)"),
        slot.confirmed_flush
            .map_or_else(|| "(none)".to_owned(), |lsn| lsn.to_string()),
    ));
    check_slot_failover(report, pg, slot, version_num);
}

/// Whether the slot survives a failover (PostgreSQL 17+): [`catalog::failover_note`].
fn check_slot_failover(
    report: &mut Report<'_>,
    pg: &PostgresConfig,
    slot: &catalog::Slot,
    version_num: Option<i32>,
) {
    let Some(version_num) = version_num else {
        return;
    };
    let wanted = catalog::failover_wanted(pg.failover(), version_num).unwrap_or(true);
    match catalog::failover_note(slot, &pg.slot, wanted) {
        Some((true, line)) => report.ok(line),
        Some((false, line)) => report.warn(line),
        None => {}
    }
}

async fn slot_absent(
    report: &mut Report<'_>,
    client: &Client,
    pg: &PostgresConfig,
    role: Option<&Role>,
) {
    let slot = pg.slot.as_str();
    match role {
        Some(role) if !role.can_replicate => {
            report.skip(format!(
                "replication slot {slot} does not exist; creating it at start needs REPLICATION, which role {} lacks (see above)",
                role.name
            ));
            return;
        }
        None => {
            report.skip(format!(
                "replication slot {slot} does not exist; whether the role may create it is unknown (see above)"
            ));
            return;
        }
        Some(_) => {}
    }
    // The relay creates the slot at start; that fails when every slot is taken.
    match catalog::slot_room(client).await {
        Ok(room) if !room.fits(pg) => report.fail(format!(
            "replication slot {slot} does not exist and {} of {} max_replication_slots are in use, so the relay cannot create it (it needs {}); raise max_replication_slots (restart) or drop an unused slot",
            room.used,
            room.max,
            SlotRoom::needed(pg)
        )),
        Ok(_) if pg.initial_snapshot => report.ok(format!(
            "replication slot {slot} does not exist; the relay will create it at start (pgoutput), after publishing the rows already in the outbox (initial_snapshot, temporary slot {})",
            pg.snapshot_slot()
        )),
        Ok(_) => report.ok(format!(
            "replication slot {slot} does not exist; the relay will create it at start (pgoutput)"
        )),
        Err(e) => report.fail(format!(
            "cannot count replication slots: {e}; fix the cause and retry"
        )),
    }
}

/// How long the broker check waits for metadata: `socket.timeout.ms` when configured (so a
/// deployment that expects a slow network, or a test that expects none, decides), else 10 s.
pub fn metadata_timeout(kafka: &KafkaConfig) -> Duration {
    kafka
        .properties
        .get("socket.timeout.ms")
        .and_then(|ms| ms.trim().parse::<u64>().ok())
        .map_or(KAFKA_TIMEOUT, Duration::from_millis)
}

/// Keeps librdkafka quiet (the check reports in its own lines) but remembers its last
/// complaint about reaching the brokers, which says why they are unreachable.
#[derive(Default)]
struct QuietContext {
    last_error: Mutex<Option<String>>,
}

impl QuietContext {
    /// Keeps `message` as the last complaint; a `vague` one only if there is none yet.
    fn remember(&self, message: String, vague: bool) {
        if let Ok(mut last) = self.last_error.lock() {
            if !vague || last.is_none() {
                *last = Some(message);
            }
        }
    }
}

impl ClientContext for QuietContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        // Configuration warnings come at client creation, sometimes after the first failed
        // connection, and say nothing about reaching a broker (the relay's own
        // enable.gapless.guarantee is "experimental" at every start).
        // The enum has no ordering; its discriminants are syslog levels (lower is worse).
        if fac != "CONFWARN" && (level as i32) <= (RDKafkaLogLevel::Warning as i32) {
            self.remember(format!("{fac}: {message}"), false);
        } else {
            tracing::debug!(target: "librdkafka", "{fac}: {message}");
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // "All broker connections are down" repeats the metadata error; the transport error
        // logged before it names the cause (refused, unresolvable, TLS).
        let vague = error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown);
        self.remember(format!("{error}: {reason}"), vague);
    }
}

impl ProducerContext for QuietContext {
    type DeliveryOpaque = ();

    // The check never produces.
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// A topic as the broker's metadata lists it.
struct TopicInfo {
    name: String,
    partitions: usize,
    error: Option<String>,
}

/// What one metadata request learned.
struct ClusterInfo {
    brokers: usize,
    topics: Vec<TopicInfo>,
}

/// Fetches cluster metadata with the relay's producer settings. Metadata for *all* topics is
/// requested: asking for one topic by name can make a broker with auto-create on create it,
/// and `check` must not create anything.
fn fetch_cluster(kafka: &KafkaConfig, timeout: Duration) -> Result<ClusterInfo, String> {
    let producer: BaseProducer<QuietContext> = crate::kafka::producer::client_config(kafka, "outbox-relay-check")
        .create_with_context(QuietContext::default())
        .map_err(|e| {
            format!("cannot create a Kafka client from [kafka]: {e}; fix or remove the offending [kafka.properties] entry")
        })?;
    let result = producer.client().fetch_metadata(None, timeout);
    if result.is_err() {
        // Logs and errors reach the context only while the client is polled, one event per
        // turn: a zero timeout would serve only the oldest (often the creation's CONFWARN),
        // a short one serves all that are queued.
        producer.poll(Duration::from_millis(100));
    }
    match result {
        Ok(metadata) => Ok(ClusterInfo {
            brokers: metadata.brokers().len(),
            topics: metadata
                .topics()
                .iter()
                .map(|t| TopicInfo {
                    name: t.name().to_owned(),
                    partitions: t.partitions().len(),
                    error: t.error().map(|e| format!("{:?}", e)),
                })
                .collect(),
        }),
        Err(e) => {
            let last = producer
                .context()
                .last_error
                .lock()
                .ok()
                .and_then(|l| l.clone());
            Err(match last {
                Some(last) => format!("{e}; last client error: {last}"),
                None => e.to_string(),
            })
        }
    }
}

/// Kafka's reachability, then each destination's topic: `(source, topic template)` for every
/// `[[outbox]]` table and `[[message]]` prefix.
async fn kafka_checks(
    report: &mut Report<'_>,
    kafka: &KafkaConfig,
    destinations: &[(String, &str)],
) {
    let timeout = metadata_timeout(kafka);
    let owned = kafka.clone();
    // librdkafka's metadata call blocks; keep it off the runtime's only thread.
    let fetched = tokio::task::spawn_blocking(move || fetch_cluster(&owned, timeout))
        .await
        .unwrap_or_else(|e| Err(format!("the metadata request did not finish: {e}")));
    let cluster = match fetched {
        Ok(cluster) if cluster.brokers > 0 => cluster,
        Ok(_) => {
            report.fail(format!(
                "Kafka at {} answered without any broker; check [kafka] brokers",
                kafka.brokers
            ));
            report.skip("topic checks: no usable broker".into());
            return;
        }
        Err(e) => {
            report.fail(format!(
                "Kafka at {} is unreachable (no metadata within {} ms): {e}; check [kafka] brokers, that the broker runs, and the security settings in [kafka.properties]",
                kafka.brokers,
                timeout.as_millis()
            ));
            report.skip("topic checks: no connection to Kafka".into());
            return;
        }
    };
    report.ok(format!(
        "Kafka reachable at {} ({} broker(s), {} topic(s))",
        kafka.brokers,
        cluster.brokers,
        cluster.topics.len()
    ));

    let mut seen: Vec<&str> = Vec::new();
    for (source, template) in destinations {
        let template = *template;
        if seen.contains(&template) {
            continue;
        }
        seen.push(template);
        // Config::load has parsed every template already; this cannot fail.
        let parsed = match Template::parse(template) {
            Ok(parsed) => parsed,
            Err(e) => {
                report.fail(format!("{source}: {e}"));
                continue;
            }
        };
        match parsed.fixed() {
            Some(template) => match cluster.topics.iter().find(|t| t.name == template) {
                Some(t) if t.error.is_none() && t.partitions > 0 => report.ok(format!(
                    "topic {template} exists ({} partition(s))",
                    t.partitions
                )),
                Some(t) => report.fail(format!(
                    "topic {template} is not usable: {}; check it on the broker",
                    t.error.as_deref().unwrap_or("no partitions")
                )),
                None => report.fail(format!(
                    "topic {template} (for {source}) does not exist; create it with the partition count you want (kafka-topics.sh --create --topic {template}); a broker with auto.create.topics.enable would create it with its defaults on first use"
                )),
            },
            None => {
                let prefix = parsed.prefix();
                let mut matching: Vec<&str> = cluster
                    .topics
                    .iter()
                    .map(|t| t.name.as_str())
                    .filter(|n| n.starts_with(prefix) && !n.starts_with("__"))
                    .collect();
                matching.sort_unstable();
                const SHOWN: usize = 20;
                let listed = if matching.is_empty() {
                    "none yet; create them before events arrive unless the broker auto-creates topics".to_owned()
                } else if matching.len() > SHOWN {
                    format!(
                        "{} and {} more",
                        matching[..SHOWN].join(", "),
                        matching.len() - SHOWN
                    )
                } else {
                    matching.join(", ")
                };
                report.info(format!(
                    "topic template {template}: existing topics with prefix {prefix:?}: {listed}"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kafka(props: &[(&str, &str)]) -> KafkaConfig {
        KafkaConfig {
            brokers: "k1:9092,k2:9092".into(),
            properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..KafkaConfig::default()
        }
    }

    #[test]
    fn lines_have_aligned_labels_and_stay_on_one_line() {
        let line = CheckLine {
            verdict: Verdict::Fail,
            message: "no column\n\"payload\"".into(),
        };
        assert_eq!(line.to_string(), "FAIL  no column \"payload\"");
        let line = CheckLine {
            verdict: Verdict::Ok,
            message: "wal_level = logical".into(),
        };
        assert_eq!(line.to_string(), "ok    wal_level = logical");
    }

    #[test]
    fn metadata_timeout_follows_socket_timeout() {
        assert_eq!(metadata_timeout(&kafka(&[])), KAFKA_TIMEOUT);
        assert_eq!(
            metadata_timeout(&kafka(&[("socket.timeout.ms", "1500")])),
            Duration::from_millis(1500)
        );
        assert_eq!(
            metadata_timeout(&kafka(&[("socket.timeout.ms", "soon")])),
            KAFKA_TIMEOUT
        );
    }

    #[test]
    fn a_multi_host_url_splits_into_one_url_per_host() {
        let split = |url: &str| per_host_urls(url, &url.parse().expect("a url"));
        assert_eq!(
            split("postgres://relay:p%40ss@h1:5432,h2:5433/app?sslmode=require"),
            [
                (
                    "h1:5432".to_owned(),
                    "postgres://relay:p%40ss@h1:5432/app?sslmode=require".to_owned()
                ),
                (
                    "h2:5433".to_owned(),
                    "postgres://relay:p%40ss@h2:5433/app?sslmode=require".to_owned()
                ),
            ]
        );
        assert_eq!(
            split("host=h1,h2 port=5432 user=relay dbname=app"),
            [
                (
                    "h1:5432".to_owned(),
                    "user=relay dbname=app host=h1 port=5432".to_owned()
                ),
                (
                    "h2:5432".to_owned(),
                    "user=relay dbname=app host=h2 port=5432".to_owned()
                ),
            ]
        );
        assert!(split("postgres://relay@db:5432/app").is_empty());
    }

    #[test]
    fn target_names_host_and_user_but_never_the_password() {
        let config: tokio_postgres::Config = "postgres://relay:s3cret@db:6432/app".parse().unwrap();
        assert_eq!(describe_target(&config), "relay@db:6432/app");
        let config: tokio_postgres::Config = "host=db user=relay password=s3cret".parse().unwrap();
        assert_eq!(describe_target(&config), "relay@db:5432/relay");
    }
}
