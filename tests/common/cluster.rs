//! A three-node Apache Kafka cluster for the fault tests: KRaft combined nodes (broker and
//! controller in each JVM) on free loopback ports, each in its own temp dir, started by
//! `scripts/kafka.sh run --voters … --cluster-id …` (with three voters the script sets
//! replication factor 3 and `min.insync.replicas=2`). Nodes are named by their node id,
//! 1 to 3. A node can be killed (`kill -9`), stopped (SIGTERM: a controlled shutdown that
//! hands its leaderships over first), frozen (SIGSTOP) and thawed, and started again on the
//! same ports and storage. Everything is killed on drop; on panic each node's log tail is
//! printed.
//!
//! Start-up and restarts wait on a blocking thread, so a writer on the test's runtime keeps
//! writing meanwhile; metadata look-ups are short blocking calls.

use std::fs;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::metadata::Metadata;
use tempfile::TempDir;

use super::broker::{create_topic_on, kafka_libs, kafka_sh, spawn_node, wait_serving, START};
use super::reader::Reader;
use super::util::{free_port, tail};

/// The line `scripts/kafka.sh run` documents as "serves requests".
const STARTED: &str = "Kafka Server started";

/// The cluster id of every test cluster (a Kafka UUID, 16 bytes in base64url): clusters of
/// concurrent tests never meet (each has its own ports), so they need not differ.
const CLUSTER_ID: &str = "b3V0Ym94LXJlbGF5LXRlcw";

type Admin = AdminClient<DefaultClientContext>;

/// One node: its JVM (`None` while down) and what starts it again.
struct Node {
    id: i32,
    child: Option<Child>,
    port: u16,
    /// `scripts/kafka.sh run` arguments, the same at every start.
    args: Vec<String>,
    dir: TempDir,
}

impl Node {
    fn log(&self) -> std::path::PathBuf {
        self.dir.path().join("kafka.log")
    }

    /// How often the node has logged that it serves requests (once per start).
    fn starts(&self) -> usize {
        fs::read_to_string(self.log()).map_or(0, |t| t.matches(STARTED).count())
    }

    fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .unwrap_or_else(|| panic!("node {} is not running", self.id))
            .id()
    }

    fn signal(&self, which: &str) {
        let pid = self.pid();
        let status = Command::new("kill")
            .arg(which)
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(
            status.success(),
            "kill {which} {pid} (node {}) failed",
            self.id
        );
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running cluster of Kafka nodes.
pub struct Cluster {
    nodes: Vec<Node>,
    admin: Arc<Admin>,
}

impl Cluster {
    /// Starts `n` (3 for RF 3) nodes and waits until each serves requests and the metadata
    /// names all of them; retries with other ports if a node dies at start (a port taken
    /// between choosing and binding it).
    pub async fn start(n: i32) -> Cluster {
        let mut last_err = String::new();
        for _ in 0..3 {
            let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
            let voters = ports
                .iter()
                .zip(1..)
                .map(|((_, c), id)| format!("{id}@127.0.0.1:{c}"))
                .collect::<Vec<_>>()
                .join(",");
            let nodes: Vec<Node> = ports
                .iter()
                .zip(1..)
                .map(|(&(port, _), id)| {
                    let dir = tempfile::Builder::new()
                        .prefix(&format!("outbox-relay-kafka{id}-"))
                        .tempdir()
                        .expect("create temp dir for a Kafka node");
                    let args = [
                        "--dir",
                        &dir.path().join("node").display().to_string(),
                        "--node-id",
                        &id.to_string(),
                        "--port",
                        &port.to_string(),
                        "--voters",
                        &voters,
                        "--cluster-id",
                        CLUSTER_ID,
                    ]
                    .map(String::from)
                    .to_vec();
                    Node {
                        id,
                        child: None,
                        port,
                        args,
                        dir,
                    }
                })
                .collect();
            let bootstrap = bootstrap_of(&nodes);
            let admin: Admin = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .create()
                .expect("create Kafka admin client");
            let mut cluster = Cluster {
                nodes,
                admin: Arc::new(admin),
            };
            let ids: Vec<i32> = (1..=n).collect();
            match cluster.launch(&ids, false).await {
                Ok(()) => {
                    let admin = cluster.admin.clone();
                    let all = tokio::task::spawn_blocking(move || {
                        let deadline = Instant::now() + START;
                        while Instant::now() < deadline {
                            if metadata(&admin).is_some_and(|m| m.brokers().len() == n as usize) {
                                return true;
                            }
                            std::thread::sleep(Duration::from_millis(200));
                        }
                        false
                    })
                    .await
                    .expect("metadata task");
                    assert!(all, "the metadata never named all {n} Kafka nodes");
                    return cluster;
                }
                Err(e) => last_err = e,
            }
        }
        panic!("the Kafka cluster did not start: {last_err}");
    }

    /// Spawns the nodes `ids` (down ones only) and waits until each logged that it serves
    /// requests. With `retry`, a node that dies at once (its old ports lingering after a
    /// kill) is spawned again until [`START`] passes; without, the first failure is returned
    /// after every node was killed.
    async fn launch(&mut self, ids: &[i32], retry: bool) -> Result<(), String> {
        let deadline = Instant::now() + START;
        let mut waits = Vec::new();
        for &id in ids {
            let node = self.node_mut(id);
            assert!(node.child.is_none(), "node {id} is already running");
            let before = node.starts();
            let dir = node.dir.path().to_owned();
            let args = node.args.clone();
            waits.push(tokio::task::spawn_blocking(move || loop {
                let mut child = spawn_node(&dir, &args);
                let log = dir.join("kafka.log");
                let serving =
                    || fs::read_to_string(&log).is_ok_and(|t| t.matches(STARTED).count() > before);
                match wait_serving(&mut child, &dir, serving) {
                    Ok(()) => return Ok(child),
                    Err(e) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        if !retry || Instant::now() >= deadline {
                            return Err(format!("node {id}: {e}"));
                        }
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }
            }));
        }
        let mut result = Ok(());
        for (&id, wait) in ids.iter().zip(waits) {
            match wait.await.expect("node start task") {
                Ok(child) => self.node_mut(id).child = Some(child),
                Err(e) => result = result.and(Err(e)),
            }
        }
        if result.is_err() {
            for node in &mut self.nodes {
                node.kill();
            }
        }
        result
    }

    fn node(&self, id: i32) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no Kafka node {id}"))
    }

    fn node_mut(&mut self, id: i32) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no Kafka node {id}"))
    }

    /// The node ids, 1 to n.
    pub fn ids(&self) -> Vec<i32> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// `bootstrap.servers` naming every node (PLAINTEXT).
    pub fn bootstrap(&self) -> String {
        bootstrap_of(&self.nodes)
    }

    /// Creates a topic with replication factor 3 (every node a replica) and waits until its
    /// metadata shows all partitions.
    pub async fn create_topic(&self, name: &str, partitions: i32) {
        create_topic_on(&self.admin, &self.bootstrap(), name, partitions, 3, &[]).await;
    }

    /// `kill -9` of node `id`: it vanishes without closing anything. Idempotent.
    pub fn kill9(&mut self, id: i32) {
        self.node_mut(id).kill();
    }

    /// SIGTERM to node `id`: a controlled shutdown (its leaderships move first); waits up to
    /// a minute for the JVM to exit, then kills it.
    pub async fn stop(&mut self, id: i32) {
        let node = self.node_mut(id);
        node.signal("-TERM");
        let mut child = node.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            if Instant::now() >= deadline {
                eprintln!("Kafka node {id} ignored SIGTERM for a minute: killed");
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGSTOP: node `id` keeps its sockets open but answers nothing, like a hung host.
    pub fn freeze(&self, id: i32) {
        self.node(id).signal("-STOP");
    }

    /// SIGCONT after [`Cluster::freeze`].
    pub fn thaw(&self, id: i32) {
        self.node(id).signal("-CONT");
    }

    /// Starts node `id` (killed or stopped) again on the same ports and storage; waits until
    /// it serves requests.
    pub async fn start_again(&mut self, id: i32) {
        self.start_all_again(&[id]).await;
    }

    /// Starts the nodes `ids` again at once (nodes of a cluster that lost its quorum wait for
    /// each other); waits until each serves requests.
    pub async fn start_all_again(&mut self, ids: &[i32]) {
        if let Err(e) = self.launch(ids, true).await {
            panic!("Kafka did not come back: {e}");
        }
    }

    /// The node that leads `topic`'s `partition` according to the metadata, if any.
    pub fn leader_of(&self, topic: &str, partition: i32) -> Option<i32> {
        let md = metadata(&self.admin)?;
        let t = md.topics().iter().find(|t| t.name() == topic)?;
        let p = t.partitions().iter().find(|p| p.id() == partition)?;
        (p.leader() >= 0).then_some(p.leader())
    }

    /// Moves every partition's leadership back to its preferred replica (Kafka's own
    /// `LeaderElectionCommand`), as the brokers' periodic rebalance would after a while: a
    /// producer still sending to the old leaders meets NOT_LEADER_OR_FOLLOWER.
    pub async fn elect_preferred_leaders(&self) {
        let bootstrap = self.bootstrap();
        let out = tokio::task::spawn_blocking(move || {
            Command::new("bash")
                .arg(kafka_sh())
                .args(["java", "org.apache.kafka.tools.LeaderElectionCommand"])
                .args(["--bootstrap-server", &bootstrap])
                .args(["--election-type", "PREFERRED", "--all-topic-partitions"])
                .env("OUTBOX_KAFKA_LIBS", kafka_libs())
                .stdin(Stdio::null())
                .output()
        })
        .await
        .expect("leader election task")
        .expect("run scripts/kafka.sh java LeaderElectionCommand");
        eprintln!(
            "preferred leader election ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }

    /// The in-sync replicas of every partition of `topics`, as (topic, partition, ISR); `None`
    /// if the metadata could not be read.
    pub fn isr(&self, topics: &[&str]) -> Option<Vec<(String, i32, Vec<i32>)>> {
        let md = metadata(&self.admin)?;
        let mut out = Vec::new();
        for t in md.topics().iter().filter(|t| topics.contains(&t.name())) {
            for p in t.partitions() {
                out.push((t.name().to_owned(), p.id(), p.isr().to_vec()));
            }
        }
        Some(out)
    }

    /// Waits up to `timeout` until every partition of `topics` has all nodes in sync (so the
    /// next fault starts from a whole cluster); returns whether they did.
    pub async fn wait_in_sync(&self, topics: &[&str], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let n = self.nodes.len();
        loop {
            let all = self.isr(topics).is_some_and(|parts| {
                !parts.is_empty() && parts.iter().all(|(_, _, isr)| isr.len() == n)
            });
            if all {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// A reader of `topics` from the beginning of all their partitions.
    pub fn reader(&self, topics: &[&str]) -> Reader {
        Reader::at(&self.bootstrap(), topics)
    }

    /// Node `id`'s output, for diagnostics.
    pub fn log(&self, id: i32) -> String {
        tail(&self.node(id).log(), 200)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if std::thread::panicking() {
                eprintln!(
                    "--- Kafka node {} log (port {}) ---\n{}",
                    node.id,
                    node.port,
                    tail(&node.log(), 40)
                );
            }
            // SIGKILL ends a frozen (SIGSTOPped) JVM too.
            node.kill();
        }
    }
}

fn bootstrap_of(nodes: &[Node]) -> String {
    nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect::<Vec<_>>()
        .join(",")
}

/// Cluster metadata from any node that answers within 2 s.
fn metadata(admin: &Admin) -> Option<Metadata> {
    admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(2))
        .ok()
}
