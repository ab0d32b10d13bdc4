//! Apache Kafka for the tests: one KRaft node (broker and controller in one JVM) on free
//! loopback ports in a temp dir, started by `scripts/kafka.sh run`, the one home of the
//! broker's settings (the demo starts it the same way). The script `exec`s the JVM, so the
//! child's pid is the broker's: SIGKILL and SIGSTOP hit it directly. Killed on drop.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use tempfile::TempDir;

use super::pki::TestPki;
use super::proxy::CutProxy;
use super::reader::{partition_count, reader_consumer, Reader, Rec, QUIET};
use super::util::{free_port, tail};

/// How long a broker may take to answer after its JVM starts (a cold JVM on a small, busy
/// machine takes seconds; this bounds waiting, it measures nothing).
pub(crate) const START: Duration = Duration::from_secs(120);

/// `scripts/kafka.sh` of this checkout.
pub fn kafka_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka.sh")
}

/// The directory of Kafka's jars (`$OUTBOX_KAFKA_LIBS`, else fetched once by
/// `scripts/kafka.sh libs`), so concurrent tests never fetch at the same time.
pub fn kafka_libs() -> &'static str {
    static LIBS: OnceLock<String> = OnceLock::new();
    LIBS.get_or_init(|| {
        if let Some(dir) = std::env::var("OUTBOX_KAFKA_LIBS")
            .ok()
            .filter(|d| Path::new(d).join(".fetched").is_file())
        {
            return dir;
        }
        let out = Command::new("bash")
            .arg(kafka_sh())
            .arg("libs")
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/kafka.sh libs");
        assert!(
            out.status.success(),
            "scripts/kafka.sh libs failed (Kafka's jars come from Maven Central; run \
             scripts/test.sh, which installs Java and Maven): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    })
}

/// What a broker listens on besides its PLAINTEXT port.
#[derive(Default)]
pub struct Listeners<'a> {
    /// An SSL and a SASL_SSL (SCRAM-SHA-512) listener with this certificate.
    pub tls: Option<&'a TestPki>,
    /// SCRAM-SHA-512 users (name, password), made when the storage is formatted.
    pub scram: &'a [(&'a str, &'a str)],
    /// The SSL listener is advertised through a [`CutProxy`], which keeps what crossed it.
    pub ssl_behind_proxy: bool,
}

/// A running Kafka node.
pub struct Broker {
    child: Child,
    /// The PLAINTEXT port it listens on.
    port: u16,
    /// The port clients are told to use: the listener, or a proxy in front of it.
    advertised: u16,
    ssl_port: Option<u16>,
    sasl_port: Option<u16>,
    /// In front of the SSL listener, when asked for.
    ssl_proxy: Option<CutProxy>,
    /// `scripts/kafka.sh run` arguments, to start the node again on the same storage.
    args: Vec<String>,
    dir: TempDir,
    admin: AdminClient<DefaultClientContext>,
}

impl Broker {
    /// Starts a node with a PLAINTEXT listener and waits until it answers metadata requests.
    pub fn start() -> Broker {
        Self::launch(&Listeners::default(), |port| (port, ())).0
    }

    /// Starts a node that also has an SSL and a SASL_SSL (SCRAM-SHA-512) listener with
    /// `pki`'s server certificate, and the SCRAM users `scram`. The harness itself reads over
    /// PLAINTEXT; [`Broker::ssl_bootstrap`] and [`Broker::sasl_bootstrap`] are for the relay.
    pub fn start_tls(pki: &TestPki, scram: &[(&str, &str)]) -> Broker {
        let listeners = Listeners {
            tls: Some(pki),
            scram,
            ssl_behind_proxy: false,
        };
        Self::launch(&listeners, |port| (port, ())).0
    }

    /// Like [`Broker::start_tls`] without SCRAM users, with both the PLAINTEXT listener (the
    /// returned proxy) and the SSL listener ([`Broker::ssl_proxy`]) reached through proxies
    /// that keep the bytes they forward: what an eavesdropper on the network would see.
    pub fn start_tls_on_a_tapped_wire(pki: &TestPki) -> (Broker, CutProxy) {
        let listeners = Listeners {
            tls: Some(pki),
            scram: &[],
            ssl_behind_proxy: true,
        };
        Self::launch(&listeners, |port| {
            let proxy = CutProxy::start(port);
            (proxy.port(), proxy)
        })
    }

    /// The proxy in front of the SSL listener ([`Broker::start_tls_on_a_tapped_wire`]).
    pub fn ssl_proxy(&self) -> &CutProxy {
        self.ssl_proxy
            .as_ref()
            .expect("started with Broker::start_tls_on_a_tapped_wire")
    }

    /// Starts a node advertising a [`CutProxy`] in front of it, so every client (the relay
    /// and the harness' own) reaches it through the proxy; `bootstrap()` is the proxy.
    pub fn start_behind_proxy() -> (Broker, CutProxy) {
        Self::launch(&Listeners::default(), |port| {
            let proxy = CutProxy::start(port);
            (proxy.port(), proxy)
        })
    }

    /// Starts the JVM on free ports, advertising the port that `front` puts before the
    /// PLAINTEXT listener (the listener itself when there is none), and waits until it
    /// answers; retries with other ports and a fresh directory if it dies (a port taken
    /// between choosing and binding it).
    fn launch<T>(listeners: &Listeners, mut front: impl FnMut(u16) -> (u16, T)) -> (Broker, T) {
        let mut last_err = String::new();
        for _ in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("outbox-relay-kafka-")
                .tempdir()
                .expect("create temp dir for Kafka");
            let port = free_port();
            let (advertised, extra) = front(port);
            let mut args: Vec<String> = vec![
                "--dir".into(),
                dir.path().join("node").display().to_string(),
                "--node-id".into(),
                "1".into(),
                "--port".into(),
                port.to_string(),
                "--controller-port".into(),
                free_port().to_string(),
            ];
            let (mut ssl_port, mut sasl_port, mut ssl_proxy) = (None, None, None);
            let mut advertise = vec![format!("PLAINTEXT://127.0.0.1:{advertised}")];
            if let Some(pki) = listeners.tls {
                let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
                fs::write(&cert, &pki.cert_pem).expect("write server.pem");
                fs::write(&key, &pki.key_pem).expect("write server.key");
                let (s, a) = (free_port(), free_port());
                let proxy = listeners.ssl_behind_proxy.then(|| CutProxy::start(s));
                let ssl_seen = proxy.as_ref().map_or(s, CutProxy::port);
                advertise.push(format!("SSL://127.0.0.1:{ssl_seen}"));
                advertise.push(format!("SASL_SSL://127.0.0.1:{a}"));
                (ssl_port, sasl_port, ssl_proxy) = (Some(ssl_seen), Some(a), proxy);
                for (flag, value) in [
                    ("--ssl-port", s.to_string()),
                    ("--sasl-port", a.to_string()),
                    ("--cert", cert.display().to_string()),
                    ("--key", key.display().to_string()),
                    ("--ca", pki.ca_path().display().to_string()),
                ] {
                    args.push(flag.into());
                    args.push(value);
                }
            }
            if advertised != port || ssl_proxy.is_some() {
                args.push("--set".into());
                args.push(format!("advertised.listeners={}", advertise.join(",")));
            }
            for (user, password) in listeners.scram {
                args.push("--scram".into());
                args.push(format!("{user}:{password}"));
            }
            let mut child = spawn_node(dir.path(), &args);
            let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                .set("bootstrap.servers", format!("127.0.0.1:{advertised}"))
                .create()
                .expect("create Kafka admin client");
            match wait_ready(&mut child, &admin, dir.path()) {
                Ok(()) => {
                    let broker = Broker {
                        child,
                        port,
                        advertised,
                        ssl_port,
                        sasl_port,
                        ssl_proxy,
                        args,
                        dir,
                        admin,
                    };
                    return (broker, extra);
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_err = e;
                }
            }
        }
        panic!("Apache Kafka did not start: {last_err}");
    }

    /// `host:port` for `bootstrap.servers` (PLAINTEXT).
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.advertised)
    }

    /// `host:port` of the SSL listener (or the proxy in front of it).
    pub fn ssl_bootstrap(&self) -> String {
        let port = self.ssl_port.expect("started with Broker::start_tls");
        format!("127.0.0.1:{port}")
    }

    /// `host:port` of the SASL_SSL (SCRAM-SHA-512) listener ([`Broker::start_tls`] only).
    pub fn sasl_bootstrap(&self) -> String {
        let port = self.sasl_port.expect("started with Broker::start_tls");
        format!("127.0.0.1:{port}")
    }

    /// The broker JVM's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
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

    /// `kill -9` of the broker: it vanishes without closing anything cleanly. Idempotent.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// After [`Broker::kill`]: the same node on the same ports and storage (topics, records
    /// and transactions as the broker left them on disk); waits until it answers.
    pub fn start_again(&mut self) {
        self.kill();
        let deadline = Instant::now() + START;
        loop {
            let mut child = spawn_node(self.dir.path(), &self.args);
            match wait_ready(&mut child, &self.admin, self.dir.path()) {
                Ok(()) => {
                    self.child = child;
                    return;
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    // The old JVM's ports may linger a moment after SIGKILL.
                    assert!(Instant::now() < deadline, "Kafka did not come back: {e}");
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }

    /// Creates a topic (replication factor 1) and waits until its metadata shows all
    /// partitions.
    pub async fn create_topic(&self, name: &str, partitions: i32) {
        self.create_topic_with(name, partitions, &[]).await;
    }

    /// Like [`Broker::create_topic`], with topic configs (e.g. `cleanup.policy=compact`).
    pub async fn create_topic_with(&self, name: &str, partitions: i32, configs: &[(&str, &str)]) {
        create_topic_on(&self.admin, &self.bootstrap(), name, partitions, 1, configs).await;
    }

    /// A reader of `topics` from the beginning of all their partitions.
    pub fn reader(&self, topics: &[&str]) -> Reader {
        Reader::at(&self.bootstrap(), topics)
    }

    /// Like [`Broker::reader`], as a consumer with `isolation.level=read_committed`.
    pub fn read_committed(&self, topics: &[&str]) -> Reader {
        Reader::read_committed(&self.bootstrap(), topics)
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

    /// Produces `key:value` records to `topic` with Kafka's own Java producer (the console
    /// producer, default partitioner, `acks=all`): the reference for where keys belong.
    /// Keys and values must not contain `:` or line breaks.
    pub fn produce_java(&self, topic: &str, records: &[(&str, &str)]) {
        use std::io::Write as _;
        let mut child = Command::new("bash")
            .arg(kafka_sh())
            .args([
                "produce-java",
                "--bootstrap",
                &self.bootstrap(),
                "--topic",
                topic,
            ])
            .env("OUTBOX_KAFKA_LIBS", kafka_libs())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run scripts/kafka.sh produce-java");
        {
            let mut stdin = child.stdin.take().expect("stdin");
            for (key, value) in records {
                writeln!(stdin, "{key}:{value}").expect("write to the Java producer");
            }
        }
        let out = child
            .wait_with_output()
            .expect("wait for the Java producer");
        assert!(
            out.status.success(),
            "the Java producer failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The broker's output, for diagnostics.
    pub fn log(&self) -> String {
        tail(&self.dir.path().join("kafka.log"), 200)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- Kafka log (port {}) ---\n{}",
                self.port,
                tail(&self.dir.path().join("kafka.log"), 40)
            );
        }
        self.kill();
    }
}

/// Creates a topic with `replication` replicas through `admin` (an existing one is fine) and
/// waits until the metadata `bootstrap` serves shows all its partitions.
pub(crate) async fn create_topic_on(
    admin: &AdminClient<DefaultClientContext>,
    bootstrap: &str,
    name: &str,
    partitions: i32,
    replication: i32,
    configs: &[(&str, &str)],
) {
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(replication));
    for (k, v) in configs {
        topic = topic.set(k, v);
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics([&topic], &opts)
        .await
        .unwrap_or_else(|e| panic!("CreateTopics {name}: {e}"));
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => panic!("CreateTopics {topic} failed: {code}"),
        }
    }
    let bootstrap = bootstrap.to_owned();
    let topic_name = name.to_owned();
    let shown = tokio::task::spawn_blocking(move || {
        let consumer = reader_consumer(&bootstrap, &[]);
        let deadline = Instant::now() + Duration::from_secs(30);
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

/// `scripts/kafka.sh run ARGS`, its output appended to DIR/kafka.log.
pub(crate) fn spawn_node(dir: &Path, args: &[String]) -> Child {
    let log = File::options()
        .create(true)
        .append(true)
        .open(dir.join("kafka.log"))
        .expect("open kafka.log");
    Command::new("bash")
        .arg(kafka_sh())
        .arg("run")
        .args(args)
        .env("OUTBOX_KAFKA_LIBS", kafka_libs())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log handle"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run scripts/kafka.sh: {e}"))
}

/// Waits until the node answers metadata requests naming a broker; `Err` with the log's tail
/// if it exits or takes longer than [`START`].
fn wait_ready(
    child: &mut Child,
    admin: &AdminClient<DefaultClientContext>,
    dir: &Path,
) -> Result<(), String> {
    wait_serving(child, dir, || {
        admin
            .inner()
            .fetch_metadata(None, Duration::from_millis(500))
            .is_ok_and(|m| !m.brokers().is_empty())
    })
}

/// Waits (blocking) until `serving()` holds for the node started as `child` in `dir`; `Err`
/// with the tail of DIR/kafka.log if the node exits first or takes longer than [`START`].
pub(crate) fn wait_serving(
    child: &mut Child,
    dir: &Path,
    mut serving: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + START;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "kafka exited ({status}):\n{}",
                tail(&dir.join("kafka.log"), 30)
            ));
        }
        if serving() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "not serving within {START:?}:\n{}",
                tail(&dir.join("kafka.log"), 30)
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
