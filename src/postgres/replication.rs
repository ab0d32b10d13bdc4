//! The replication stream: a `replication=database` connection to PostgreSQL, framed by hand
//! on `postgres-protocol`'s encoders and parsers, that starts logical replication and yields
//! XLogData and keepalives while sending standby status updates back.
//!
//! `tokio-postgres` has no replication mode and `postgres-protocol` does not parse the
//! CopyBothResponse ('W') message, so frames are split here by tag and length first.

use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::config::ChannelBinding;

use crate::lsn::Lsn;
use crate::postgres::connect::{OpenError, PgEndpoint, Socket};

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01 UTC).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// The longest message accepted from the server. PostgreSQL caps one field at 1 GB and Kafka
/// one record at 1e9 bytes, so a longer message is a corrupt length or a row no broker would
/// take; reserving for it would only risk the memory bound.
const MAX_FRAME: usize = (1 << 30) + (1 << 20);

/// Why the replication connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The socket failed or closed.
    #[error("replication connection I/O error: {0}")]
    Io(#[from] io::Error),
    /// The server answered with an ErrorResponse.
    #[error("PostgreSQL error {code}: {message}{}", hint.as_ref().map(|h| format!(" (hint: {h})")).unwrap_or_default())]
    Server {
        /// SQLSTATE, e.g. `55006` when the slot is in use.
        code: String,
        /// The server's message.
        message: String,
        /// The server's hint, if any.
        hint: Option<String>,
    },
    /// Authentication could not proceed (no password given, unsupported method).
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The server sent something this client does not expect.
    #[error("unexpected message from PostgreSQL: {0}")]
    Protocol(String),
    /// The connection parameters are unusable.
    #[error("{0}")]
    Config(String),
    /// Every reachable host listed is a standby (a failover may be under way).
    #[error("no primary among the listed hosts: {0}")]
    NotPrimary(String),
}

impl ReplicationError {
    /// The SQLSTATE when the server refused something.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

type Result<T, E = ReplicationError> = std::result::Result<T, E>;

/// One backend frame: the two kinds replication needs, or anything else parsed by `postgres-protocol`.
enum Frame {
    CopyData(Bytes),
    CopyBothResponse,
    Other(backend::Message),
}

/// A temporary slot and the snapshot its creation exported.
#[derive(Debug, Clone)]
pub struct ExportedSnapshot {
    /// Where the slot's stream starts: every transaction committed before it is in the
    /// snapshot, every one committed after it is in the stream.
    pub consistent_point: Lsn,
    /// The snapshot's name, for `SET TRANSACTION SNAPSHOT`.
    pub name: String,
}

/// A replication-mode connection, before and during streaming.
pub struct ReplicationConnection {
    /// `host:port` of the server, as `[postgres] url` names it.
    host: String,
    socket: Box<dyn Socket>,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

/// What SCRAM channel binding can use on this connection, and what the URL asks of it.
struct ChannelBindingData {
    /// Whether the socket is TLS.
    tls: bool,
    /// `tls-server-end-point` data of the TLS session, if any.
    end_point: Option<Vec<u8>>,
    /// The URL's `channel_binding` (`prefer` unless set).
    policy: ChannelBinding,
}

/// What the walsender sent inside CopyBoth.
#[derive(Debug)]
pub enum ReplicationEvent {
    /// A chunk of decoded WAL: one pgoutput message.
    XLogData {
        /// WAL position the data starts at.
        wal_start: Lsn,
        /// The server's current WAL end.
        wal_end: Lsn,
        /// The pgoutput message.
        data: Bytes,
    },
    /// A primary keepalive.
    Keepalive {
        /// The server's current WAL end; everything before it has been sent.
        wal_end: Lsn,
        /// The server wants a status update now or it will time us out.
        reply_requested: bool,
    },
}

/// The server's answer to `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone)]
pub struct SystemIdentity {
    /// The cluster's system identifier.
    pub system_id: String,
    /// The timeline.
    pub timeline: u32,
    /// The current WAL flush position.
    pub xlog_pos: Lsn,
}

impl ReplicationConnection {
    /// Connects in `replication=database` mode to the first listed host that is a primary,
    /// trying them in order as libpq does, and authenticates. A standby is never streamed
    /// from (logical decoding on a standby would follow it, not the primary): with no primary
    /// reachable the error is a connection error, retried like any lost connection, since a
    /// standby may be promoted any moment.
    pub async fn connect(endpoint: &PgEndpoint) -> Result<Self> {
        let mut definite = None;
        let mut last = None;
        for host in 0..endpoint.host_count().max(1) {
            match Self::connect_host(endpoint, host).await {
                Ok(conn) => return Ok(conn),
                // A wrong password or a refused option says more than a host that is down.
                Err(e @ (ReplicationError::Io(_) | ReplicationError::NotPrimary(_))) => {
                    last = Some(e)
                }
                Err(e) => {
                    definite.get_or_insert(e);
                }
            }
        }
        Err(definite
            .or(last)
            .unwrap_or_else(|| ReplicationError::Config("[postgres] url names no host".into())))
    }

    async fn connect_host(endpoint: &PgEndpoint, host: usize) -> Result<Self> {
        let mut conn = Self::open(endpoint, host).await?;
        // One host: a standby is a configuration error the server itself reports
        // (`catalog`'s IN_RECOVERY); only among several is it a host to pass over.
        if endpoint.host_count() < 2 {
            return Ok(conn);
        }
        let rows = conn.simple_query("SELECT pg_is_in_recovery()").await?;
        let in_recovery = rows.first().and_then(|r| r.first()).cloned().flatten();
        if in_recovery.as_deref() != Some("f") {
            return Err(ReplicationError::NotPrimary(format!(
                "{} is a standby (in recovery), and the relay streams only from the primary",
                endpoint.host_label(host)
            )));
        }
        Ok(conn)
    }

    async fn open(endpoint: &PgEndpoint, host: usize) -> Result<Self> {
        let config = endpoint.config();
        let user = config
            .get_user()
            .ok_or_else(|| ReplicationError::Config("the URL names no user".into()))?;
        let dbname = config.get_dbname().unwrap_or(user);
        let opened = endpoint.open_host(host).await?;
        let mut conn = ReplicationConnection {
            host: endpoint.host_label(host),
            socket: opened.socket,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(1024),
        };
        frontend::startup_message(
            [
                ("user", user),
                ("database", dbname),
                ("replication", "database"),
                ("application_name", "outbox-relay"),
                ("client_encoding", "UTF8"),
                // A slot created with EXPORT_SNAPSHOT keeps the walsender in a transaction
                // until its next command (sent once the snapshot is imported): a short
                // server-wide idle_in_transaction_session_timeout must not end the session
                // meanwhile, which would take the temporary slot with it.
                ("idle_in_transaction_session_timeout", "0"),
            ],
            &mut conn.wbuf,
        )?;
        conn.flush().await?;
        let binding = ChannelBindingData {
            tls: opened.tls,
            end_point: opened.tls_server_end_point,
            policy: config.get_channel_binding(),
        };
        conn.authenticate(user, config.get_password(), &binding)
            .await?;
        conn.wait_ready().await?;
        Ok(conn)
    }

    async fn authenticate(
        &mut self,
        user: &str,
        password: Option<&[u8]>,
        binding: &ChannelBindingData,
    ) -> Result<()> {
        let need_password = || {
            password.ok_or_else(|| {
                ReplicationError::Auth(format!(
                    "the server wants a password for user {user}, but the URL has none"
                ))
            })
        };
        // channel_binding=require: refuse before a password leaves on an unbound session.
        let unbound = |how: &str| {
            if binding.policy == ChannelBinding::Require {
                Err(ReplicationError::Auth(format!(
                    "channel_binding=require, but the server authenticates {how}{}: use sslmode=require (or stricter) with scram-sha-256 in pg_hba.conf, or drop channel_binding=require",
                    if binding.tls { "" } else { " and the connection is not TLS" }
                )))
            } else {
                Ok(())
            }
        };
        let mut scram: Option<sasl::ScramSha256> = None;
        loop {
            match self.expect_other().await? {
                backend::Message::AuthenticationOk => {
                    if scram.is_none() {
                        unbound("without SCRAM (trust)")?;
                    }
                    return Ok(());
                }
                backend::Message::AuthenticationCleartextPassword => {
                    unbound("with a cleartext password")?;
                    frontend::password_message(need_password()?, &mut self.wbuf)?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    unbound("with md5")?;
                    let hash = md5_hash(user.as_bytes(), need_password()?, body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf)?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut offered = Vec::new();
                    while let Some(m) = mechanisms.next()? {
                        offered.push(m.to_owned());
                    }
                    let has_plus = offered.iter().any(|m| m == sasl::SCRAM_SHA_256_PLUS);
                    let has_scram = offered.iter().any(|m| m == sasl::SCRAM_SHA_256);
                    let end_point = binding
                        .end_point
                        .as_ref()
                        .filter(|_| binding.policy != ChannelBinding::Disable);
                    let (channel_binding, mechanism) = match (has_plus, end_point) {
                        // Bind SCRAM to this TLS session: a man in the middle holding another
                        // certificate cannot relay the exchange.
                        (true, Some(hash)) => (
                            sasl::ChannelBinding::tls_server_end_point(hash.clone()),
                            sasl::SCRAM_SHA_256_PLUS,
                        ),
                        // TLS, but no -PLUS on offer: say we could bind ("y"), so a server
                        // that does support it detects a downgrade.
                        (false, Some(_)) if has_scram => {
                            (sasl::ChannelBinding::unrequested(), sasl::SCRAM_SHA_256)
                        }
                        _ if has_scram => {
                            (sasl::ChannelBinding::unsupported(), sasl::SCRAM_SHA_256)
                        }
                        _ => {
                            return Err(ReplicationError::Auth(format!(
                                "the server offers only {offered:?}; SCRAM-SHA-256 (optionally -PLUS) is supported"
                            )))
                        }
                    };
                    if mechanism != sasl::SCRAM_SHA_256_PLUS {
                        unbound("without channel binding")?;
                    }
                    let s = sasl::ScramSha256::new(need_password()?, channel_binding);
                    frontend::sasl_initial_response(mechanism, s.message(), &mut self.wbuf)?;
                    scram = Some(s);
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Protocol("SASL continue before SASL start".into())
                    })?;
                    s.update(body.data())
                        .map_err(|e| ReplicationError::Auth(e.to_string()))?;
                    frontend::sasl_response(s.message(), &mut self.wbuf)?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Protocol("SASL final before SASL start".into())
                    })?;
                    s.finish(body.data())
                        .map_err(|e| ReplicationError::Auth(e.to_string()))?;
                    continue;
                }
                _ => {
                    return Err(ReplicationError::Auth(
                        "the server asked for an authentication method this client does not support (use trust, md5, password or scram-sha-256)".into(),
                    ))
                }
            }
            self.flush().await?;
        }
    }

    async fn wait_ready(&mut self) -> Result<()> {
        loop {
            if let backend::Message::ReadyForQuery(_) = self.expect_other().await? {
                return Ok(());
            }
        }
    }

    /// Runs one simple-protocol command and returns its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        frontend::query(sql, &mut self.wbuf)?;
        self.flush().await?;
        let mut rows = Vec::new();
        loop {
            match self.expect_other().await? {
                backend::Message::DataRow(body) => {
                    let buf = body.buffer();
                    let mut ranges = body.ranges();
                    let mut row = Vec::new();
                    while let Some(range) = ranges.next()? {
                        row.push(range.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                    }
                    rows.push(row);
                }
                backend::Message::ReadyForQuery(_) => return Ok(rows),
                _ => {}
            }
        }
    }

    /// `IDENTIFY_SYSTEM`: the cluster id, timeline and current WAL position.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let field = |i: usize| rows.first().and_then(|r| r.get(i)).cloned().flatten();
        let bad = || ReplicationError::Protocol("malformed IDENTIFY_SYSTEM answer".into());
        Ok(SystemIdentity {
            system_id: field(0).ok_or_else(bad)?,
            timeline: field(1).and_then(|t| t.parse().ok()).ok_or_else(bad)?,
            xlog_pos: field(2).and_then(|l| l.parse().ok()).ok_or_else(bad)?,
        })
    }

    /// `CREATE_REPLICATION_SLOT … TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT`: a slot that
    /// lives only as long as this connection (so a crash leaves nothing behind), and the
    /// snapshot its creation exported. The snapshot can be imported only until this
    /// connection runs its next command. (This spelling, not the parenthesised one of
    /// PostgreSQL 15, is accepted by every supported major.)
    pub async fn create_temporary_slot(&mut self, slot: &str) -> Result<ExportedSnapshot> {
        // Names were validated to [a-z0-9_], so quoting them is enough.
        let rows = self
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT \"{slot}\" TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT"
            ))
            .await?;
        let field = |i: usize| rows.first().and_then(|r| r.get(i)).cloned().flatten();
        let bad = || ReplicationError::Protocol("malformed CREATE_REPLICATION_SLOT answer".into());
        Ok(ExportedSnapshot {
            consistent_point: field(1).and_then(|l| l.parse().ok()).ok_or_else(bad)?,
            name: field(2).ok_or_else(bad)?,
        })
    }

    /// `host:port` of the server this connection reached, as `[postgres] url` names it.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `server_version_num` of the server this connection reached, e.g. 170004.
    pub async fn server_version_num(&mut self) -> Result<i32> {
        let rows = self.simple_query("SHOW server_version_num").await?;
        rows.first()
            .and_then(|r| r.first())
            .cloned()
            .flatten()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                ReplicationError::Protocol("malformed SHOW server_version_num answer".into())
            })
    }

    /// Whether `slot` exists and is not a failover slot (PostgreSQL 17+, whose
    /// `pg_replication_slots` has the column).
    pub async fn slot_lacks_failover(&mut self, slot: &str) -> Result<bool> {
        // Names were validated to [a-z0-9_], so quoting them is enough.
        let rows = self
            .simple_query(&format!(
                "SELECT failover FROM pg_replication_slots WHERE slot_name = '{slot}'"
            ))
            .await?;
        let failover = rows.first().and_then(|r| r.first()).cloned().flatten();
        Ok(failover.as_deref() == Some("f"))
    }

    /// `ALTER_REPLICATION_SLOT … (FAILOVER true)` (PostgreSQL 17+): standbys with
    /// `sync_replication_slots = on` then keep a copy of the slot, which survives a failover.
    /// Refused (SQLSTATE 55006) while another walsender streams from the slot.
    pub async fn set_failover(&mut self, slot: &str) -> Result<()> {
        // Names were validated to [a-z0-9_], so quoting them is enough.
        self.simple_query(&format!(
            "ALTER_REPLICATION_SLOT \"{slot}\" ( FAILOVER true )"
        ))
        .await
        .map(|_| ())
    }

    /// Ends the session politely (Terminate); a temporary slot goes with it.
    pub async fn close(mut self) -> Result<()> {
        frontend::terminate(&mut self.wbuf);
        self.flush().await?;
        Ok(())
    }

    /// Starts streaming the slot from `start` (`0/0`: the slot's confirmed position); with
    /// `messages`, pgoutput also sends logical decoding messages (PostgreSQL 14 and later).
    pub async fn start_replication(
        mut self,
        slot: &str,
        publication: &str,
        start: Lsn,
        messages: bool,
    ) -> Result<ReplicationStream> {
        // Names were validated to [a-z0-9_], so quoting them is enough.
        let messages = if messages { ", messages 'true'" } else { "" };
        let sql = format!(
            "START_REPLICATION SLOT \"{slot}\" LOGICAL {start} (proto_version '1', publication_names '\"{publication}\"'{messages})"
        );
        frontend::query(&sql, &mut self.wbuf)?;
        self.flush().await?;
        loop {
            match self.next_frame().await? {
                Frame::CopyBothResponse => return Ok(ReplicationStream { conn: self }),
                Frame::Other(backend::Message::NoticeResponse(_)) => {}
                Frame::Other(backend::Message::ErrorResponse(body)) => {
                    return Err(server_error(&body)?)
                }
                _ => {
                    return Err(ReplicationError::Protocol(
                        "expected CopyBothResponse after START_REPLICATION".into(),
                    ))
                }
            }
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.socket.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        self.socket.flush().await
    }

    /// Reads the next whole frame. Cancel-safe: bytes stay in `rbuf` until a frame is complete.
    async fn next_frame(&mut self) -> Result<Frame> {
        loop {
            if let Some(frame) = self.split_frame()? {
                return Ok(frame);
            }
            if self.socket.read_buf(&mut self.rbuf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "PostgreSQL closed the replication connection",
                )
                .into());
            }
        }
    }

    fn split_frame(&mut self) -> Result<Option<Frame>> {
        let Some(header) = backend::Header::parse(&self.rbuf)? else {
            return Ok(None);
        };
        let total = 1 + header.len() as usize;
        if total > MAX_FRAME {
            return Err(ReplicationError::Protocol(format!(
                "the server announced a {total}-byte message, more than the {MAX_FRAME} bytes one outbox row can need; the stream is corrupt or not PostgreSQL's"
            )));
        }
        if self.rbuf.len() < total {
            self.rbuf.reserve(total - self.rbuf.len());
            return Ok(None);
        }
        let frame = match header.tag() {
            b'd' => {
                let mut f = self.rbuf.split_to(total);
                f.advance(5);
                Frame::CopyData(f.freeze())
            }
            b'W' => {
                self.rbuf.advance(total);
                Frame::CopyBothResponse
            }
            _ => {
                let mut f = self.rbuf.split_to(total);
                match backend::Message::parse(&mut f)? {
                    Some(m) => Frame::Other(m),
                    None => {
                        return Err(ReplicationError::Protocol(format!(
                            "incomplete message with tag {:?}",
                            header.tag() as char
                        )))
                    }
                }
            }
        };
        Ok(Some(frame))
    }

    /// The next non-CopyData frame, turning ErrorResponse into an error and skipping notices.
    async fn expect_other(&mut self) -> Result<backend::Message> {
        loop {
            match self.next_frame().await? {
                Frame::Other(backend::Message::ErrorResponse(body)) => {
                    return Err(server_error(&body)?)
                }
                Frame::Other(backend::Message::NoticeResponse(_)) => {}
                Frame::Other(m) => return Ok(m),
                Frame::CopyData(_) | Frame::CopyBothResponse => {
                    return Err(ReplicationError::Protocol(
                        "unexpected copy message outside replication".into(),
                    ))
                }
            }
        }
    }
}

/// A connection in CopyBoth mode.
pub struct ReplicationStream {
    conn: ReplicationConnection,
}

impl ReplicationStream {
    /// The next XLogData or keepalive. Cancel-safe.
    pub async fn next_event(&mut self) -> Result<ReplicationEvent> {
        loop {
            let frame = self.conn.next_frame().await?;
            if let Some(event) = event_of(frame)? {
                return Ok(event);
            }
        }
    }

    /// The next event if a whole one is already buffered: lets the caller handle a burst
    /// without a trip through its `select!` per record.
    pub fn next_buffered(&mut self) -> Result<Option<ReplicationEvent>> {
        while let Some(frame) = self.conn.split_frame()? {
            if let Some(event) = event_of(frame)? {
                return Ok(Some(event));
            }
        }
        Ok(None)
    }

    /// Sends a standby status update: `received` as written, `confirmed` as flushed and applied.
    pub async fn send_status(&mut self, received: Lsn, confirmed: Lsn) -> Result<()> {
        let mut msg = BytesMut::with_capacity(34);
        msg.put_u8(b'r');
        msg.put_u64(received.0);
        msg.put_u64(confirmed.0);
        msg.put_u64(confirmed.0);
        msg.put_i64(pg_now_micros());
        msg.put_u8(0);
        frontend::CopyData::new(msg.freeze())?.write(&mut self.conn.wbuf);
        self.conn.flush().await?;
        Ok(())
    }

    /// Ends the stream politely: CopyDone, then Terminate.
    pub async fn close(mut self) -> Result<()> {
        frontend::copy_done(&mut self.conn.wbuf);
        frontend::terminate(&mut self.conn.wbuf);
        self.conn.flush().await?;
        Ok(())
    }
}

/// What a frame means during streaming: an event, nothing (a notice), or the stream's end.
fn event_of(frame: Frame) -> Result<Option<ReplicationEvent>> {
    match frame {
        Frame::CopyData(data) => parse_copy_data(data),
        Frame::Other(backend::Message::ErrorResponse(body)) => Err(server_error(&body)?),
        Frame::Other(backend::Message::NoticeResponse(_)) => Ok(None),
        // A fast shutdown ends the stream with CopyDone or CommandComplete; either way the
        // server is going away and a reconnect is the answer.
        Frame::Other(
            backend::Message::CopyDone
            | backend::Message::CommandComplete(_)
            | backend::Message::ReadyForQuery(_),
        ) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "PostgreSQL ended the replication stream",
        )
        .into()),
        _ => Err(ReplicationError::Protocol(
            "unexpected message during replication".into(),
        )),
    }
}

fn parse_copy_data(mut data: Bytes) -> Result<Option<ReplicationEvent>> {
    let short = || ReplicationError::Protocol("truncated replication message".into());
    if data.is_empty() {
        return Err(short());
    }
    match data.get_u8() {
        b'w' => {
            if data.len() < 24 {
                return Err(short());
            }
            let wal_start = Lsn(data.get_u64());
            let wal_end = Lsn(data.get_u64());
            let _send_time = data.get_i64();
            Ok(Some(ReplicationEvent::XLogData {
                wal_start,
                wal_end,
                data,
            }))
        }
        b'k' => {
            if data.len() < 17 {
                return Err(short());
            }
            let wal_end = Lsn(data.get_u64());
            let _send_time = data.get_i64();
            Ok(Some(ReplicationEvent::Keepalive {
                wal_end,
                reply_requested: data.get_u8() != 0,
            }))
        }
        // Unknown CopyData kinds are future protocol additions we have no use for.
        _ => Ok(None),
    }
}

fn server_error(body: &backend::ErrorResponseBody) -> Result<ReplicationError> {
    let (mut code, mut message, mut hint) = (String::new(), String::new(), None);
    let mut fields = body.fields();
    while let Some(f) = fields.next()? {
        let value = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'C' => code = value,
            b'M' => message = value,
            b'H' => hint = Some(value),
            _ => {}
        }
    }
    Ok(ReplicationError::Server {
        code,
        message,
        hint,
    })
}

/// Now, in microseconds since PostgreSQL's epoch.
pub fn pg_now_micros() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    unix - PG_EPOCH_OFFSET_MICROS
}

/// Seconds from a PostgreSQL commit timestamp (µs since its epoch) until now; never negative,
/// so a clock a little behind the server's does not produce nonsense latencies.
pub fn secs_since(commit_time: i64) -> f64 {
    ((pg_now_micros() - commit_time) as f64 / 1e6).max(0.0)
}

impl From<OpenError> for ReplicationError {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Io(e) => ReplicationError::Io(e),
            // Config errors stop the relay: a rejected certificate will not fix itself.
            OpenError::Tls(message) => ReplicationError::Config(message),
        }
    }
}
