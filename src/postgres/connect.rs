//! Where and how to reach PostgreSQL: the parsed URL, the password file and TLS; opens both
//! plain SQL connections and the sockets the replication stream runs on.
//!
//! TLS follows libpq: `sslmode` (`disable`, `prefer` (default), `require`, `verify-ca`,
//! `verify-full`) and `sslrootcert` come from the URL's query string or the key=value string.
//! tokio-postgres knows neither `verify-*` nor `sslrootcert`, so both are taken out of the
//! string before it is parsed and applied here, by rustls, on both kinds of connection.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::Host;
use tokio_postgres::Client;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::{ConfigError, PostgresConfig};

/// Where verify-* modes find CA certificates when `sslrootcert` is not given.
const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A byte stream to the server: TCP, a Unix socket, or TLS over TCP.
pub trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Socket for T {}

/// libpq's `sslmode`: whether to use TLS and how much of the server's certificate to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS if the server offers it, plain otherwise (libpq's default).
    #[default]
    Prefer,
    /// TLS or nothing; the certificate is not checked unless `sslrootcert` is given.
    Require,
    /// TLS with a certificate chain that leads to a trusted CA; any host name.
    VerifyCa,
    /// TLS with a trusted chain and a certificate that names the host connected to.
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling, e.g. `verify-full`.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode {other:?} is not supported: use disable, prefer, require, verify-ca or verify-full"
                ))
            }
        })
    }
}

/// How much of the server's certificate is checked (after libpq's rules are applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verify {
    /// Encrypt only.
    Nothing,
    /// The chain must end at a trusted CA; the name is not checked.
    Chain,
    /// Chain and host name.
    Full,
}

/// The TLS half of a [`PgEndpoint`].
#[derive(Clone)]
struct Tls {
    mode: SslMode,
    verify: Verify,
    /// Where the trusted CAs come from, for error messages.
    roots: String,
    /// `None` exactly when `mode` is `disable`.
    client: Option<Arc<ClientConfig>>,
}

/// Why a connection to PostgreSQL could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The network failed (refused, reset, unreachable): a later attempt may succeed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// TLS cannot work as configured (certificate rejected, server without TLS although
    /// sslmode requires it): retrying does not help, the configuration must change.
    #[error("{0}")]
    Tls(String),
}

/// An open connection's byte stream, plus what SCRAM channel binding needs from its TLS.
pub struct PgStream {
    /// TCP, a Unix socket, or TLS over TCP.
    pub socket: Box<dyn Socket>,
    /// Whether `socket` is TLS.
    pub tls: bool,
    /// `tls-server-end-point` channel-binding data: the hash of the server's certificate;
    /// `None` without TLS or when the certificate's signature algorithm defines no hash.
    pub tls_server_end_point: Option<Vec<u8>>,
}

/// Everything needed to connect to the configured PostgreSQL.
#[derive(Clone)]
pub struct PgEndpoint {
    config: tokio_postgres::Config,
    url: String,
    tls: Tls,
}

impl PgEndpoint {
    /// Parses `[postgres] url` (with libpq's `sslmode` and `sslrootcert`) and reads
    /// `password_file` and the `sslrootcert` file.
    pub fn new(pg: &PostgresConfig) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: "[postgres]".into(),
            message,
        };
        let split = split_tls_params(&pg.url);
        let mut config: tokio_postgres::Config = split.rest.parse().map_err(|e| {
            invalid(format!(
                "url is not a valid PostgreSQL URL or key=value string: {e}"
            ))
        })?;
        if let Some(file) = &pg.password_file {
            let password = std::fs::read_to_string(file)
                .map_err(|e| invalid(format!("cannot read password_file {file}: {e}")))?;
            config.password(password.trim_end_matches(['\r', '\n']));
        }
        let mode = match split.sslmode.as_deref() {
            Some(value) => SslMode::parse(value).map_err(|m| invalid(format!("url: {m}")))?,
            None => SslMode::default(),
        };
        // tokio-postgres only negotiates; checking the certificate is our TlsConnect's job.
        config.ssl_mode(match mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        // With several hosts listed, a standby must never be taken for the primary, whatever
        // the URL says (libpq would take the first host that answers); a single host that is a
        // standby is refused by name at start (`catalog`'s IN_RECOVERY).
        if config.get_hosts().len().max(config.get_hostaddrs().len()) > 1 {
            config.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
        }
        let tls = Tls::new(mode, split.sslrootcert.as_deref())
            .map_err(|m| invalid(format!("url: {m}")))?;
        Ok(PgEndpoint {
            config,
            url: redact(&pg.url),
            tls,
        })
    }

    /// The URL with its password hidden, for logs and errors.
    pub fn display_url(&self) -> &str {
        &self.url
    }

    /// The parsed connection parameters (without `sslmode`'s verify modes and `sslrootcert`,
    /// which tokio-postgres does not know; see [`PgEndpoint::ssl_mode`]).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// The configured `sslmode`.
    pub fn ssl_mode(&self) -> SslMode {
        self.tls.mode
    }

    /// Opens a plain SQL connection (not replication) and drives it in the background.
    pub async fn connect_sql(&self) -> Result<Client, tokio_postgres::Error> {
        let (client, conn) = self
            .config
            .connect(MakeRustlsConnect {
                tls: self.tls.clone(),
            })
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("SQL connection closed: {e}");
            }
        });
        Ok(client)
    }

    /// How many hosts the URL lists (libpq's multi-host form, `h1:5432,h2:5432` or
    /// `host=h1,h2`); tried in this order.
    pub fn host_count(&self) -> usize {
        self.config
            .get_hosts()
            .len()
            .max(self.config.get_hostaddrs().len())
    }

    /// `host:port` of the `i`-th host, for logs, errors and the metrics.
    pub fn host_label(&self, i: usize) -> String {
        let port = self.port_of(i);
        match (
            self.config.get_hosts().get(i),
            self.config.get_hostaddrs().get(i),
        ) {
            (Some(Host::Tcp(name)), _) => format!("{name}:{port}"),
            (_, Some(addr)) => format!("{addr}:{port}"),
            (Some(Host::Unix(dir)), None) => format!("{}:{port}", dir.display()),
            (None, None) => format!("?:{port}"),
        }
    }

    fn port_of(&self, i: usize) -> u16 {
        let ports = self.config.get_ports();
        ports.get(i).or(ports.first()).copied().unwrap_or(5432)
    }

    /// Opens the byte stream a replication connection to the `i`-th host runs on: TCP (or a
    /// Unix socket), then SSLRequest and the TLS handshake as `sslmode` says, within
    /// `connect_timeout` if one is set. Which host is the primary is the caller's question.
    pub async fn open_host(&self, i: usize) -> Result<PgStream, OpenError> {
        let hosts = self.config.get_hosts();
        let hostaddrs = self.config.get_hostaddrs();
        let attempt = self.open_one(hosts.get(i), hostaddrs.get(i), self.port_of(i));
        match self.config.get_connect_timeout() {
            Some(limit) => match tokio::time::timeout(*limit, attempt).await {
                Ok(result) => result,
                Err(_) => Err(OpenError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within connect_timeout ({limit:?})"),
                ))),
            },
            None => attempt.await,
        }
    }

    async fn open_one(
        &self,
        host: Option<&Host>,
        hostaddr: Option<&IpAddr>,
        port: u16,
    ) -> Result<PgStream, OpenError> {
        // As libpq: hostaddr is where to connect, host is the name the certificate must show.
        let name = match (host, hostaddr) {
            (Some(Host::Tcp(name)), _) => name.clone(),
            (_, Some(addr)) => addr.to_string(),
            (Some(Host::Unix(dir)), None) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let stream = UnixStream::connect(&path).await?;
                // PostgreSQL has no TLS on Unix sockets; the socket's permissions protect it.
                if matches!(self.tls.mode, SslMode::Disable | SslMode::Prefer) {
                    return Ok(PgStream {
                        socket: Box::new(stream),
                        tls: false,
                        tls_server_end_point: None,
                    });
                }
                return Err(OpenError::Tls(format!(
                    "sslmode={} needs TLS, which PostgreSQL does not offer on the Unix socket {}: connect over TCP (host=name) or use sslmode=prefer",
                    self.tls.mode.as_str(),
                    path.display()
                )));
            }
            (None, None) => {
                return Err(OpenError::Io(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the URL names no host",
                )))
            }
        };
        let stream = match hostaddr {
            Some(addr) => TcpStream::connect((*addr, port)).await?,
            None => TcpStream::connect((name.as_str(), port)).await?,
        };
        // Status updates are tiny and latency matters more than packet count.
        let _ = stream.set_nodelay(true);
        self.tls.negotiate(stream, &name, port).await
    }
}

impl Tls {
    fn new(mode: SslMode, rootcert: Option<&str>) -> Result<Tls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        if mode == SslMode::Disable {
            return Ok(Tls {
                mode,
                verify: Verify::Nothing,
                roots: String::new(),
                client: None,
            });
        }
        // libpq: a root certificate makes every TLS mode check the chain; only verify-full
        // checks the name. Without one, verify-* use the default CAs and the rest check nothing.
        let verify = match (mode, rootcert) {
            (SslMode::VerifyFull, _) => Verify::Full,
            (SslMode::VerifyCa, _) | (_, Some(_)) => Verify::Chain,
            _ => Verify::Nothing,
        };
        if rootcert == Some("system") && mode != SslMode::VerifyFull {
            return Err(format!(
                "sslrootcert=system needs sslmode=verify-full (as in libpq), not {}: set sslmode=verify-full or name a CA file in sslrootcert",
                mode.as_str()
            ));
        }
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot set up TLS: {e}"))?;
        let (roots, verifier): (String, Arc<dyn ServerCertVerifier>) = if verify == Verify::Nothing
        {
            (String::new(), Arc::new(NoCertificateCheck(provider)))
        } else {
            let (store, roots) = match rootcert {
                Some(path) if path != "system" => {
                    (load_roots(path)?, format!("sslrootcert {path}"))
                }
                _ => system_roots(),
            };
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider)
                .build()
                .map_err(|e| format!("cannot use the CA certificates of {roots}: {e}"))?;
            let verifier: Arc<dyn ServerCertVerifier> = match verify {
                Verify::Full => webpki,
                _ => Arc::new(ChainOnly(webpki)),
            };
            (roots, verifier)
        };
        let mut client = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        // What libpq 17 sends; servers that predate ALPN ignore it.
        client.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(Tls {
            mode,
            verify,
            roots,
            client: Some(Arc::new(client)),
        })
    }

    /// SSLRequest, the server's one-byte answer, then the handshake or the plain stream.
    async fn negotiate(
        &self,
        mut stream: TcpStream,
        name: &str,
        port: u16,
    ) -> Result<PgStream, OpenError> {
        if self.mode == SslMode::Disable {
            return Ok(PgStream {
                socket: Box::new(stream),
                tls: false,
                tls_server_end_point: None,
            });
        }
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::ssl_request(&mut buf);
        stream.write_all(&buf).await?;
        // Exactly one byte: anything after 'S' belongs to TLS (CVE-2021-23222).
        let answer = stream.read_u8().await?;
        match answer {
            b'S' => {
                let (tls, end_point) = self.handshake(stream, name).await?;
                Ok(PgStream {
                    socket: Box::new(tls),
                    tls: true,
                    tls_server_end_point: end_point,
                })
            }
            b'N' if self.mode == SslMode::Prefer => Ok(PgStream {
                socket: Box::new(stream),
                tls: false,
                tls_server_end_point: None,
            }),
            b'N' => Err(OpenError::Tls(format!(
                "PostgreSQL at {name}:{port} does not accept TLS connections (it answered N to SSLRequest) but sslmode={}: set ssl = on on the server or use sslmode=prefer",
                self.mode.as_str()
            ))),
            other => Err(OpenError::Tls(format!(
                "PostgreSQL at {name}:{port} answered SSLRequest with {:?} instead of S or N: check that host and port are a PostgreSQL server",
                other as char
            ))),
        }
    }

    /// The TLS handshake, checking the certificate as configured; returns the stream and
    /// the `tls-server-end-point` channel-binding data.
    async fn handshake<S>(
        &self,
        stream: S,
        name: &str,
    ) -> Result<(TlsStream<S>, Option<Vec<u8>>), OpenError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let Some(client) = &self.client else {
            return Err(OpenError::Tls(
                "TLS was negotiated although sslmode=disable".into(),
            ));
        };
        let server_name = match ServerName::try_from(name.to_owned()) {
            Ok(n) => n,
            Err(_) if self.verify != Verify::Full => {
                // Nothing checks the name: any placeholder will do (no SNI is sent for an IP).
                ServerName::IpAddress(IpAddr::from([127, 0, 0, 1]).into())
            }
            Err(_) => {
                return Err(OpenError::Tls(format!(
                    "sslmode=verify-full needs a host name to check the server certificate against, but {name:?} is not a valid DNS name or IP address: set host to the name in the certificate"
                )))
            }
        };
        let connector = TlsConnector::from(client.clone());
        let tls = connector
            .connect(server_name, stream)
            .await
            .map_err(|e| self.handshake_error(e, name))?;
        let end_point = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|leaf| tls_server_end_point(leaf.as_ref()));
        Ok((tls, end_point))
    }

    /// Turns a failed handshake into a message naming the cause and the fix.
    fn handshake_error(&self, e: io::Error, name: &str) -> OpenError {
        let Some(tls) = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        else {
            // The socket itself failed: worth another try.
            return OpenError::Io(io::Error::new(
                e.kind(),
                format!("TLS handshake with {name} failed: {e}"),
            ));
        };
        let message = match tls {
            rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                presented,
                ..
            }) => format!(
                "server certificate for {} is not valid for host {name}: connect with a name in the certificate or use sslmode=verify-ca",
                presented_names(presented)
            ),
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName) => format!(
                "server certificate is not valid for host {name}: connect with a name in the certificate or use sslmode=verify-ca"
            ),
            // BadSignature: a CA of the same name but another key, as good as unknown.
            rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            ) => format!(
                "server certificate of {name} is not signed by a CA in {}: set sslrootcert to the CA that issued it, or sslmode=require to encrypt without verifying",
                self.roots
            ),
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            ) => format!(
                "server certificate of {name} has expired: renew it on the server (or check this machine's clock)"
            ),
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
            ) => format!(
                "server certificate of {name} is not valid yet: check the clocks of this machine and the server"
            ),
            rustls::Error::InvalidCertificate(other) => format!(
                "server certificate of {name} was rejected ({other}): fix the certificate, or use sslmode=require to encrypt without verifying"
            ),
            rustls::Error::AlertReceived(alert) => format!(
                "PostgreSQL at {name} aborted the TLS handshake ({alert:?}): see the server log for why"
            ),
            other => format!(
                "TLS handshake with {name} failed ({other}): see the server log, or use sslmode=disable if TLS is not wanted"
            ),
        };
        OpenError::Tls(message)
    }
}

/// `["DnsName(\"db\")", "IpAddress(10.0.0.1)"]` as `db, 10.0.0.1`.
fn presented_names(presented: &[String]) -> String {
    if presented.is_empty() {
        return "no name".into();
    }
    presented
        .iter()
        .map(|p| {
            let inner = p
                .strip_prefix("DnsName(\"")
                .and_then(|s| s.strip_suffix("\")"))
                .or_else(|| {
                    p.strip_prefix("IpAddress(")
                        .and_then(|s| s.strip_suffix(')'))
                });
            inner.unwrap_or(p).to_owned()
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The CA certificates in a PEM file.
fn load_roots(path: &str) -> Result<RootCertStore, String> {
    let pem = std::fs::read(path).map_err(|e| {
        format!("cannot read sslrootcert {path}: {e}; point it at the PEM file of the CA that signed the server's certificate")
    })?;
    let mut store = RootCertStore::empty();
    let mut bad = None;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        match cert {
            Ok(cert) => {
                if let Err(e) = store.add(cert) {
                    bad = Some(e.to_string());
                }
            }
            Err(e) => bad = Some(e.to_string()),
        }
    }
    if store.is_empty() {
        return Err(format!(
            "sslrootcert {path} holds no usable PEM certificate{}: point it at the PEM file (-----BEGIN CERTIFICATE-----) of the CA that signed the server's certificate",
            bad.map(|b| format!(" ({b})")).unwrap_or_default()
        ));
    }
    Ok(store)
}

/// The system's CA bundle if there is one, else the Mozilla list compiled in (for images
/// without ca-certificates); with a description for error messages.
fn system_roots() -> (RootCertStore, String) {
    if let Ok(store) = load_roots(SYSTEM_CA_FILE) {
        return (store, format!("the system CA store ({SYSTEM_CA_FILE})"));
    }
    let store = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    (store, "the built-in Mozilla CA list".into())
}

/// `sslmode=require`/`prefer` without `sslrootcert`: encrypt, but accept any certificate
/// (as libpq does). Handshake signatures are still checked so the session key is sound.
#[derive(Debug)]
struct NoCertificateCheck(Arc<CryptoProvider>);

impl ServerCertVerifier for NoCertificateCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the full WebPKI check, except that a name mismatch is accepted.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            // webpki checks the chain before the name, so this error means the chain passed.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// RFC 5929 `tls-server-end-point`: the leaf certificate hashed with its signature's hash,
/// MD5 and SHA-1 upgraded to SHA-256, as PostgreSQL computes it (a mismatch fails SCRAM). `None` for algorithms
/// without a hash of their own (Ed25519, RSA-PSS), where PostgreSQL cannot bind either.
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    // OID bodies of the signature algorithms (1.2.840.113549.1.1.x, 1.2.840.10045.4.x).
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    let oid = signature_algorithm_oid(cert_der)?;
    let (prefix, last) = oid.split_at(oid.len().checked_sub(1)?);
    let bits = match (prefix, last) {
        (RSA, [0x04 | 0x05 | 0x0b]) => 256, // md5, sha1, sha256
        (RSA, [0x0e]) => 224,
        (RSA, [0x0c]) => 384,
        (RSA, [0x0d]) => 512,
        _ if oid == ECDSA_SHA1 => 256,
        (ECDSA_SHA2, [0x01]) => 224,
        (ECDSA_SHA2, [0x02]) => 256,
        (ECDSA_SHA2, [0x03]) => 384,
        (ECDSA_SHA2, [0x04]) => 512,
        _ => return None,
    };
    Some(match bits {
        224 => Sha224::digest(cert_der).to_vec(),
        256 => Sha256::digest(cert_der).to_vec(),
        384 => Sha384::digest(cert_der).to_vec(),
        _ => Sha512::digest(cert_der).to_vec(),
    })
}

/// The `signatureAlgorithm` OID of a DER certificate:
/// `SEQUENCE { tbsCertificate, SEQUENCE { OID, params }, signature }`.
fn signature_algorithm_oid(der: &[u8]) -> Option<&[u8]> {
    let (0x30, cert, _) = der_element(der)? else {
        return None;
    };
    let (_, _tbs, rest) = der_element(cert)?;
    let (0x30, algorithm, _) = der_element(rest)? else {
        return None;
    };
    let (0x06, oid, _) = der_element(algorithm)? else {
        return None;
    };
    Some(oid)
}

/// One DER element: (tag, contents, what follows). Only what certificates use.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, after) = rest.split_at(n);
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, &b| acc << 8 | usize::from(b))
    };
    if rest.len() < len {
        return None;
    }
    let (contents, after) = rest.split_at(len);
    Some((tag, contents, after))
}

/// tokio-postgres' hook for TLS on SQL connections, backed by the endpoint's rustls config.
#[derive(Clone)]
struct MakeRustlsConnect {
    tls: Tls,
}

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for MakeRustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = OpenError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, OpenError> {
        Ok(RustlsConnect {
            tls: self.tls.clone(),
            name: domain.to_owned(),
        })
    }
}

/// One TLS handshake for tokio-postgres.
struct RustlsConnect {
    tls: Tls,
    name: String,
}

impl<S> tokio_postgres::tls::TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = OpenError;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, OpenError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let (stream, end_point) = self.tls.handshake(stream, &self.name).await?;
            Ok(RustlsStream { stream, end_point })
        })
    }
}

/// A TLS stream that hands tokio-postgres the channel-binding data for SCRAM-SHA-256-PLUS.
struct RustlsStream<S> {
    stream: TlsStream<S>,
    end_point: Option<Vec<u8>>,
}

impl<S> tokio_postgres::tls::TlsStream for RustlsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        match &self.end_point {
            Some(hash) => tokio_postgres::tls::ChannelBinding::tls_server_end_point(hash.clone()),
            None => tokio_postgres::tls::ChannelBinding::none(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// tokio-postgres' wording when the server answers N to SSLRequest under sslmode=require.
const SERVER_WITHOUT_TLS: &str = "server does not support TLS";

/// For an error of [`PgEndpoint::connect_sql`]: a one-line cause-and-fix message when TLS
/// cannot work as configured (a rejected certificate, a server without TLS although sslmode
/// requires it), which retrying will not change; `None` for anything else.
pub fn tls_config_error(e: &tokio_postgres::Error) -> Option<String> {
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if let Some(OpenError::Tls(message)) = cause.downcast_ref::<OpenError>() {
            return Some(message.clone());
        }
        if cause.to_string() == SERVER_WITHOUT_TLS {
            return Some(
                "the server does not accept TLS connections (it answered N to SSLRequest) but sslmode requires TLS: set ssl = on on the server or use sslmode=prefer".into(),
            );
        }
        source = cause.source();
    }
    None
}

/// The URL (or key=value string) split into what tokio-postgres parses and the TLS settings.
#[derive(Debug, PartialEq, Eq)]
struct Split {
    /// The input without `sslmode` and `sslrootcert`.
    rest: String,
    sslmode: Option<String>,
    sslrootcert: Option<String>,
}

/// Takes `sslmode` and `sslrootcert` out of a URL's query string or a key=value string (the
/// last occurrence wins, as in libpq). Malformed input is returned as it is, for
/// tokio-postgres to report.
fn split_tls_params(s: &str) -> Split {
    let mut split = Split {
        rest: s.to_owned(),
        sslmode: None,
        sslrootcert: None,
    };
    let mut take = |key: &str, value: String| match key {
        "sslmode" => {
            split.sslmode = Some(value);
            true
        }
        "sslrootcert" => {
            split.sslrootcert = Some(value);
            true
        }
        _ => false,
    };
    let rest = if let Some((base, query)) = split_url(s) {
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .filter(|pair| {
                let Some((key, value)) = pair.split_once('=') else {
                    return true;
                };
                match (percent_decode(key), percent_decode(value)) {
                    (Some(key), Some(value)) => !take(&key, value),
                    _ => true,
                }
            })
            .collect();
        if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else if let Some(params) = kv_params(s) {
        let kept: Vec<&str> = params
            .into_iter()
            .filter(|p| !take(p.key, p.value.clone()))
            .map(|p| &s[p.span.clone()])
            .collect();
        kept.join(" ")
    } else {
        s.to_owned()
    };
    split.rest = rest;
    split
}

/// A `postgres://` URL as (everything before the query, the query without `?`).
fn split_url(s: &str) -> Option<(&str, &str)> {
    let scheme = ["postgres://", "postgresql://"]
        .into_iter()
        .find(|p| s.starts_with(p))?;
    // As tokio-postgres: the user info ends at the first '@', the query starts after it.
    let after_creds = s[scheme.len()..]
        .find('@')
        .map_or(scheme.len(), |at| scheme.len() + at);
    match s[after_creds..].find('?') {
        Some(q) => Some((&s[..after_creds + q], &s[after_creds + q + 1..])),
        None => Some((s, "")),
    }
}

fn percent_decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// One `key=value` of a key=value connection string, with its place in the string.
struct KvParam<'a> {
    key: &'a str,
    value: String,
    span: std::ops::Range<usize>,
}

/// Splits a key=value string by tokio-postgres' (and libpq's) rules: whitespace between
/// pairs, optional whitespace around `=`, values in single quotes or bare, `\` escapes.
fn kv_params(s: &str) -> Option<Vec<KvParam<'_>>> {
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut params = Vec::new();
    let skip_ws = |i: &mut usize| {
        while *i < bytes.len() && bytes[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= bytes.len() {
            return Some(params);
        }
        let start = i;
        while i < bytes.len() && !bytes[i].is_ascii_whitespace() && bytes[i] != b'=' {
            i += 1;
        }
        let key = &s[start..i];
        skip_ws(&mut i);
        if bytes.get(i) != Some(&b'=') {
            return None;
        }
        i += 1;
        skip_ws(&mut i);
        let mut value = Vec::new();
        if bytes.get(i) == Some(&b'\'') {
            i += 1;
            loop {
                match bytes.get(i)? {
                    b'\'' => {
                        i += 1;
                        break;
                    }
                    b'\\' => {
                        value.push(*bytes.get(i + 1)?);
                        i += 2;
                    }
                    &b => {
                        value.push(b);
                        i += 1;
                    }
                }
            }
        } else {
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                if bytes[i] == b'\\' && i + 1 < bytes.len() {
                    i += 1;
                }
                value.push(bytes[i]);
                i += 1;
            }
            if value.is_empty() {
                return None;
            }
        }
        params.push(KvParam {
            key,
            value: String::from_utf8(value).ok()?,
            span: start..i,
        });
    }
}

/// The URL with its password replaced, for logs and errors: in the user info, in a
/// `password=` query parameter, or in a key=value string.
pub fn redact(url: &str) -> String {
    if let Some((base, query)) = split_url(url) {
        let base = redact_user_info(base);
        if query.is_empty() {
            return base;
        }
        let query: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if percent_decode(key).as_deref() == Some("password") => {
                    format!("{key}=***")
                }
                _ => pair.to_owned(),
            })
            .collect();
        return format!("{base}?{}", query.join("&"));
    }
    let Some(params) = kv_params(url) else {
        // Not parseable: hide everything after a password keyword rather than risk a leak.
        return match url.find("password") {
            Some(at) => format!("{}password=***", &url[..at]),
            None => url.to_owned(),
        };
    };
    let mut out = String::with_capacity(url.len());
    let mut last = 0;
    for p in params.iter().filter(|p| p.key == "password") {
        out.push_str(&url[last..p.span.start]);
        out.push_str("password=***");
        last = p.span.end;
    }
    out.push_str(&url[last..]);
    out
}

/// `postgres://user:secret@host/db` as `postgres://user:***@host/db`.
fn redact_user_info(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &authority[..colon],
            &rest[at..]
        ),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(url: &str) -> Result<PgEndpoint, String> {
        let pg = PostgresConfig {
            url: url.into(),
            password_file: None,
            slot: "s".into(),
            publication: "p".into(),
            status_interval_secs: 10,
            initial_snapshot: false,
            failover_slot: None,
        };
        PgEndpoint::new(&pg).map_err(|e| e.to_string())
    }

    #[test]
    fn several_hosts_are_listed_in_order_in_both_spellings() {
        for url in [
            "postgres://relay@db1:5432,db2:5433/app",
            "host=db1,db2 port=5432,5433 user=relay dbname=app",
        ] {
            let e = endpoint(url).expect("a multi-host url");
            assert_eq!(e.host_count(), 2, "{url}");
            assert_eq!(e.host_label(0), "db1:5432", "{url}");
            assert_eq!(e.host_label(1), "db2:5433", "{url}");
        }
        let one = endpoint("postgres://relay@db/app").expect("one host");
        assert_eq!((one.host_count(), one.host_label(0)), (1, "db:5432".into()));
    }

    /// A CA certificate in a temporary PEM file.
    fn ca_file() -> tempfile::NamedTempFile {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("self-signed CA");
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), cert.pem()).expect("write CA");
        file
    }

    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(
            redact("postgres://relay:s3cret@db:5432/app"),
            "postgres://relay:***@db:5432/app"
        );
        assert_eq!(redact("postgres://relay@db/app"), "postgres://relay@db/app");
        assert_eq!(redact("host=db user=x"), "host=db user=x");
        assert_eq!(
            redact("postgres://relay@db/app?sslmode=require&password=s3cret"),
            "postgres://relay@db/app?sslmode=require&password=***"
        );
        assert_eq!(
            redact("host=db password='se cret' user=x"),
            "host=db password=*** user=x"
        );
        assert_eq!(
            redact("host=db password='unterminated"),
            "host=db password=***"
        );
    }

    #[test]
    fn sslmode_and_sslrootcert_come_out_of_a_url() {
        let s = split_tls_params(
            "postgres://u:p%3F@h:5/db?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        );
        assert_eq!(
            s,
            Split {
                rest: "postgres://u:p%3F@h:5/db?application_name=x".into(),
                sslmode: Some("verify-full".into()),
                sslrootcert: Some("/etc/ca.pem".into()),
            }
        );
        let s = split_tls_params("postgresql://h/db?sslmode=require");
        assert_eq!(s.rest, "postgresql://h/db");
        assert_eq!(s.sslmode.as_deref(), Some("require"));
        // A '?' in the password is not the query.
        let s = split_tls_params("postgres://u:a?b@h/db");
        assert_eq!(s.rest, "postgres://u:a?b@h/db");
        assert_eq!(s.sslmode, None);
    }

    #[test]
    fn sslmode_and_sslrootcert_come_out_of_a_key_value_string() {
        let s = split_tls_params(
            "host=h sslmode = verify-ca  user=u sslrootcert='/a b/ca.pem' password='x y'",
        );
        assert_eq!(
            s,
            Split {
                rest: "host=h user=u password='x y'".into(),
                sslmode: Some("verify-ca".into()),
                sslrootcert: Some("/a b/ca.pem".into()),
            }
        );
    }

    #[test]
    fn endpoints_accept_every_libpq_mode() {
        let ca = ca_file();
        let ca = ca.path().display();
        for (url, mode) in [
            ("postgres://u@h/db", SslMode::Prefer),
            ("postgres://u@h/db?sslmode=disable", SslMode::Disable),
            ("postgres://u@h/db?sslmode=prefer", SslMode::Prefer),
            ("postgres://u@h/db?sslmode=require", SslMode::Require),
            ("postgres://u@h/db?sslmode=verify-ca", SslMode::VerifyCa),
            (
                &format!("postgres://u@h/db?sslmode=verify-full&sslrootcert={ca}"),
                SslMode::VerifyFull,
            ),
            (
                &format!("host=h user=u sslmode=verify-ca sslrootcert={ca}"),
                SslMode::VerifyCa,
            ),
        ] {
            let e = endpoint(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(e.ssl_mode(), mode, "{url}");
            let expected = match mode {
                SslMode::Disable => tokio_postgres::config::SslMode::Disable,
                SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                _ => tokio_postgres::config::SslMode::Require,
            };
            assert_eq!(e.config().get_ssl_mode(), expected, "{url}");
        }
        // libpq: require with a root certificate checks the chain, like verify-ca.
        let e = endpoint(&format!(
            "postgres://u@h/db?sslmode=require&sslrootcert={ca}"
        ))
        .expect("require + sslrootcert");
        assert_eq!(e.tls.verify, Verify::Chain);
        assert_eq!(
            endpoint("postgres://u@h/db?sslmode=require")
                .map(|e| e.tls.verify)
                .ok(),
            Some(Verify::Nothing)
        );
        assert_eq!(
            endpoint("postgres://u@h/db?sslmode=verify-full")
                .map(|e| e.tls.verify)
                .ok(),
            Some(Verify::Full)
        );
    }

    #[test]
    fn bad_tls_settings_are_one_line_errors() {
        for (url, wanted) in [
            ("postgres://u@h/db?sslmode=verify_full", "sslmode \"verify_full\" is not supported: use disable, prefer, require, verify-ca or verify-full"),
            ("host=h sslmode=allow", "sslmode \"allow\" is not supported"),
            ("postgres://u@h/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem", "cannot read sslrootcert /nonexistent/ca.pem"),
            ("postgres://u@h/db?sslmode=require&sslrootcert=system", "sslrootcert=system needs sslmode=verify-full"),
        ] {
            let e = endpoint(url).err().unwrap_or_else(|| panic!("{url} was accepted"));
            assert!(e.contains(wanted), "{url}: {e}");
            assert!(!e.contains('\n'), "{url}: {e}");
        }
        let not_pem = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(not_pem.path(), "hello").expect("write");
        let url = format!(
            "host=h sslmode=verify-ca sslrootcert={}",
            not_pem.path().display()
        );
        let e = endpoint(&url)
            .err()
            .expect("a file without certificates is refused");
        assert!(e.contains("holds no usable PEM certificate"), "{e}");
    }

    #[test]
    fn end_point_hash_follows_the_signature_algorithm() {
        for (alg, len) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, 32),
            (&rcgen::PKCS_ECDSA_P384_SHA384, 48),
            (&rcgen::PKCS_ED25519, 0),
        ] {
            let key = rcgen::KeyPair::generate_for(alg).expect("key");
            let params =
                rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
            let cert = params.self_signed(&key).expect("cert");
            let hash = tls_server_end_point(cert.der());
            assert_eq!(hash.as_ref().map_or(0, Vec::len), len, "{alg:?}");
            if len == 32 {
                assert_eq!(hash, Some(Sha256::digest(cert.der()).to_vec()));
            }
        }
        assert_eq!(tls_server_end_point(b"\x30\x03\x02\x01"), None);
    }

    #[test]
    fn presented_names_are_shown_plainly() {
        assert_eq!(
            presented_names(&[
                "DnsName(\"localhost\")".into(),
                "IpAddress(127.0.0.1)".into()
            ]),
            "localhost, 127.0.0.1"
        );
    }
}
