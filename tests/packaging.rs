//! The files users copy (docker/, config/, migrations/) stay consistent with the relay: they
//! parse, name only metrics the relay exports, and wire the probes to the right endpoints.

use std::path::Path;

use outbox_relay::config::Config;
use outbox_relay::metrics::Metrics;
use yaml_rust2::{Yaml, YamlLoader};

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

fn yaml(path: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn env(var: &str) -> Option<String> {
    Some(format!("<{var}>"))
}

/// Metric names (without `_bucket`/`_sum`/`_count`) in the relay's exposition once traffic
/// flowed (labelled series appear with their first use).
fn exported_metrics() -> Vec<String> {
    let metrics = Metrics::new();
    metrics
        .events_published
        .with_label_values(&["public.outbox", "outbox.event.order"])
        .inc();
    metrics
        .publish_errors
        .with_label_values(&["outbox.event.order", "MsgSizeTooLarge"])
        .inc();
    let text = String::from_utf8(metrics.render()).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Every `outbox_relay_*` identifier in `text`.
fn metric_names_in(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("outbox_relay_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.push(base.to_owned());
        rest = &tail[end..];
    }
    out
}

#[test]
fn dashboard_and_alerts_use_only_exported_metrics() {
    let exported = exported_metrics();
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("docker/grafana-dashboard.json")).expect("dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6, "dashboard has {} panels", panels.len());
    let alerts = yaml("docker/prometheus-alerts.yml");
    let rules = alerts[0]["groups"][0]["rules"]
        .as_vec()
        .expect("alert rules");
    assert!(rules.len() >= 4);
    let mut used = metric_names_in(&dashboard.to_string());
    for r in rules {
        used.extend(metric_names_in(r["expr"].as_str().expect("expr")));
    }
    assert!(!used.is_empty());
    for name in &used {
        assert!(
            exported.contains(name),
            "{name} is not exported; exported: {exported:?}"
        );
    }
    for wanted in [
        "outbox_relay_replication_lag_bytes",
        "outbox_relay_commit_to_ack_seconds",
        "outbox_relay_slot_wal_status",
        "outbox_relay_publish_errors_total",
    ] {
        assert!(used.iter().any(|u| u == wanted), "{wanted} is not watched");
    }
}

#[test]
fn compose_runs_postgres_with_logical_wal_kafka_the_relay_and_prometheus() {
    let doc = &yaml("docker/compose.yaml")[0];
    let services = doc["services"].as_hash().expect("services");
    for s in ["postgres", "kafka", "relay", "prometheus"] {
        assert!(
            services.contains_key(&Yaml::String(s.into())),
            "no {s} service"
        );
    }
    let command: Vec<&str> = doc["services"]["postgres"]["command"]
        .as_vec()
        .expect("postgres command")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert!(command.contains(&"wal_level=logical"), "{command:?}");
    let relay_config = read("docker/relay.toml");
    let config = Config::parse(&relay_config, "docker/relay.toml", env).expect("relay.toml");
    assert_eq!(config.metrics.listen.as_deref(), Some("0.0.0.0:9187"));
    let prometheus = &yaml("docker/prometheus.yml")[0];
    let target = prometheus["scrape_configs"][0]["static_configs"][0]["targets"][0]
        .as_str()
        .expect("scrape target");
    assert_eq!(target, "relay:9187");
}

#[test]
fn k8s_sidecar_probes_the_relay_and_its_config_parses() {
    let docs = yaml("docker/k8s-sidecar.yaml");
    let config_map = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("ConfigMap"))
        .expect("ConfigMap");
    let toml = config_map["data"]["relay.toml"]
        .as_str()
        .expect("relay.toml");
    let config = Config::parse(toml, "ConfigMap relay.toml", env).expect("ConfigMap config");
    let port = config.metrics.listen.expect("metrics listen");
    let deployment = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("Deployment"))
        .expect("Deployment");
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_vec()
        .expect("containers");
    let relay = containers
        .iter()
        .find(|c| c["name"].as_str() == Some("outbox-relay"))
        .expect("outbox-relay container");
    assert_eq!(
        relay["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        relay["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    let container_port = relay["ports"][0]["containerPort"].as_i64().expect("port");
    assert!(
        port.ends_with(&format!(":{container_port}")),
        "{port} vs {container_port}"
    );
}

#[test]
fn dockerfile_runs_unprivileged_with_a_healthcheck() {
    let dockerfile = read("docker/Dockerfile");
    assert!(dockerfile.contains("HEALTHCHECK"), "no HEALTHCHECK");
    assert!(dockerfile.contains("/healthz"));
    assert!(dockerfile.contains("EXPOSE 9187"));
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "runs as {user}"
    );
}

#[test]
fn example_config_parses_and_documents_every_key() {
    let text = read("config/relay.example.toml");
    Config::parse(&text, "config/relay.example.toml", env).expect("example parses");
    // Commented-out optional keys count as documented.
    for key in [
        "url",
        "password_file",
        "slot",
        "publication",
        "status_interval_secs",
        "table",
        "id_column",
        "key_column",
        "type_column",
        "payload_column",
        "topic",
        "header_columns",
        "brokers",
        "[kafka.properties]",
        "listen",
        "shutdown_timeout_secs",
        "reconnect_max_backoff_secs",
        "stall_timeout_secs",
        "sslmode",
        "message.timeout.ms",
    ] {
        assert!(
            text.contains(key),
            "config/relay.example.toml does not mention {key}"
        );
    }
}
