//! Where and how to reach PostgreSQL: the parsed URL, the password file, and (later) TLS;
//! opens both plain SQL connections and the sockets the replication stream runs on.

use std::io;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::Host;
use tokio_postgres::{Client, NoTls};

use crate::config::{ConfigError, PostgresConfig};

/// A byte stream to the server: TCP, a Unix socket, or TLS over TCP.
pub trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Socket for T {}

/// Everything needed to connect to the configured PostgreSQL.
#[derive(Clone)]
pub struct PgEndpoint {
    config: tokio_postgres::Config,
    url: String,
}

impl PgEndpoint {
    /// Parses `[postgres] url` (and reads `password_file`).
    pub fn new(pg: &PostgresConfig) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: "[postgres]".into(),
            message,
        };
        let mut config: tokio_postgres::Config = pg.url.parse().map_err(|e| {
            invalid(format!(
                "url is not a valid PostgreSQL URL or key=value string: {e}"
            ))
        })?;
        if let Some(file) = &pg.password_file {
            let password = std::fs::read_to_string(file)
                .map_err(|e| invalid(format!("cannot read password_file {file}: {e}")))?;
            config.password(password.trim_end_matches(['\r', '\n']));
        }
        Ok(PgEndpoint {
            config,
            url: redact(&pg.url),
        })
    }

    /// The URL with its password hidden, for logs and errors.
    pub fn display_url(&self) -> &str {
        &self.url
    }

    /// The parsed connection parameters.
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// Opens a plain SQL connection (not replication) and drives it in the background.
    pub async fn connect_sql(&self) -> Result<Client, tokio_postgres::Error> {
        let (client, conn) = self.config.connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("SQL connection closed: {e}");
            }
        });
        Ok(client)
    }

    /// Opens the byte stream a replication connection runs on.
    pub async fn open_socket(&self) -> io::Result<Box<dyn Socket>> {
        let hosts = self.config.get_hosts();
        let ports = self.config.get_ports();
        let mut last = None;
        for (i, host) in hosts.iter().enumerate() {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            let attempt: io::Result<Box<dyn Socket>> = match host {
                Host::Tcp(name) => TcpStream::connect((name.as_str(), port)).await.map(|s| {
                    // Status updates are tiny and latency matters more than packet count.
                    let _ = s.set_nodelay(true);
                    Box::new(s) as Box<dyn Socket>
                }),
                Host::Unix(dir) => UnixStream::connect(dir.join(format!(".s.PGSQL.{port}")))
                    .await
                    .map(|s| Box::new(s) as Box<dyn Socket>),
            };
            match attempt {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "the URL names no host")
        }))
    }
}

/// The URL with its password replaced, for logs and errors.
pub fn redact(url: &str) -> String {
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
    use super::redact;

    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(
            redact("postgres://relay:s3cret@db:5432/app"),
            "postgres://relay:***@db:5432/app"
        );
        assert_eq!(redact("postgres://relay@db/app"), "postgres://relay@db/app");
        assert_eq!(redact("host=db user=x"), "host=db user=x");
    }
}
