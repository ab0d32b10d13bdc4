//! The files users copy (docker/, config/, migrations/) and the docs that explain them (the
//! README, docs/operations.md) stay consistent with the relay. No Docker engine or Kubernetes
//! runs here, so instead of building and starting them this parses each one and checks what a
//! user would notice: the compose stack starts PostgreSQL with logical WAL and mounts files
//! that exist, the relay configs in compose and in the Kubernetes ConfigMap parse with the
//! relay's own parser, probes and ports meet the config, the image runs unprivileged with a
//! health check, the dashboard and alerts name only metrics the relay exports, and the example
//! config names every key with its real default.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use outbox_relay::config::Config;
use outbox_relay::ops::metrics::Metrics;
use yaml_rust2::{Yaml, YamlLoader};

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    let full = root().join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

fn yaml(path: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Files in `dir` (relative to the repository) whose names end with one of `exts`, sorted.
fn files_in(dir: &str, exts: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(root().join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| {
            e.expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| exts.iter().any(|ext| name.ends_with(ext)))
        .map(|name| format!("{dir}/{name}"))
        .collect();
    out.sort();
    out
}

fn str_of<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, found {y:?}"))
}

fn vec_of<'a>(y: &'a Yaml, what: &str) -> &'a Vec<Yaml> {
    y.as_vec()
        .unwrap_or_else(|| panic!("{what}: expected a list, found {y:?}"))
}

/// A scalar as text, whatever YAML type it was read as (`9187`, `"9187"`, `true`).
fn scalar(y: &Yaml) -> Option<String> {
    match y {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The port of a `host:port` address.
fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr:?}"))
}

/// `${VAR}` references in `text`.
fn env_refs(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else { break };
        out.insert(after[..end].to_owned());
        rest = &after[end + 1..];
    }
    out
}

/// Parses a relay config; `${VAR}` resolves only for the names in `env` (what the container
/// is given), so a reference nobody sets fails here as it would at start.
fn parse_config(text: &str, what: &str, env: &BTreeSet<String>) -> Config {
    Config::parse(text, what, |var| {
        env.contains(var).then(|| format!("value-of-{var}"))
    })
    .unwrap_or_else(|e| panic!("{what} does not parse: {e}"))
}

/// The config with nothing but the required keys: every other value is the relay's default.
fn minimal_config() -> Config {
    Config::parse(
        "[postgres]\nurl = \"postgres://u@h/d\"\n[[outbox]]\ntable = \"public.outbox\"\n\
         [kafka]\nbrokers = \"k:9092\"\n",
        "minimal",
        |_| None,
    )
    .expect("minimal config")
}

/// Durations as compose and Kubernetes write them: `30s`, `2m`, `1m30s`, or a bare number of
/// seconds.
fn seconds(text: &str) -> u64 {
    if let Ok(n) = text.parse() {
        return n;
    }
    let (mut total, mut number) = (0, String::new());
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = number
            .parse()
            .unwrap_or_else(|_| panic!("bad duration {text:?}"));
        number.clear();
        total += n * match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => panic!("bad duration {text:?}"),
        };
    }
    assert!(number.is_empty(), "bad duration {text:?}");
    total
}

// ---------------------------------------------------------------------------------------------
// metrics: what the relay exports, and where names are used
// ---------------------------------------------------------------------------------------------

/// Metric names (without `_bucket`/`_sum`/`_count`) in the relay's exposition once traffic
/// flowed (labelled series appear with their first use).
fn exported_metrics() -> BTreeSet<String> {
    let metrics = Metrics::new();
    metrics
        .events_published
        .with_label_values(&["public.outbox", "outbox.event.order"])
        .inc();
    metrics
        .publish_errors
        .with_label_values(&["outbox.event.order", "MsgSizeTooLarge"])
        .inc();
    metrics.commit_to_ack_seconds.observe(0.01);
    let text = String::from_utf8(metrics.render()).expect("exposition is UTF-8");
    let names: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    assert!(names.len() >= 12, "exported: {names:?}");
    names
}

/// Every `outbox_relay_*` identifier in `text`, with `_bucket`/`_sum`/`_count` stripped.
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

fn assert_exported(used: &[String], exported: &BTreeSet<String>, file: &str) {
    assert!(!used.is_empty(), "{file} names no outbox_relay_ metric");
    for name in used {
        assert!(
            exported.contains(name),
            "{file} uses {name}, which the relay does not export; exported: {exported:?}"
        );
    }
}

/// `(title, exprs)` of every panel of the Grafana dashboard.
fn dashboard_panels() -> Vec<(String, Vec<String>)> {
    let text = read("docker/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&text).expect("docker/grafana-dashboard.json is JSON");
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    // The data source is a template variable, so an import asks for it.
    let templating = dashboard["templating"]["list"]
        .as_array()
        .expect("templating");
    assert!(
        templating
            .iter()
            .any(|v| v["name"] == "datasource" && v["type"] == "datasource"),
        "no datasource variable: {templating:?}"
    );
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    panels
        .iter()
        .map(|p| {
            let title = p["title"].as_str().expect("panel title").to_owned();
            assert!(
                ids.insert(p["id"].as_i64().expect("panel id")),
                "{title}: duplicate id"
            );
            assert!(p["gridPos"]["w"].as_i64().is_some(), "{title}: no gridPos");
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
            let exprs: Vec<String> = p["targets"]
                .as_array()
                .unwrap_or_else(|| panic!("{title}: no targets"))
                .iter()
                .map(|t| {
                    assert!(
                        t["refId"].as_str().is_some(),
                        "{title}: target without refId"
                    );
                    t["expr"].as_str().expect("expr").to_owned()
                })
                .collect();
            assert!(!exprs.is_empty(), "{title}: no queries");
            (title, exprs)
        })
        .collect()
}

/// The alerting rules as `(name, expr, rule)`.
fn alert_rules() -> Vec<(String, String, Yaml)> {
    let docs = yaml("docker/prometheus-alerts.yml");
    let groups = vec_of(&docs[0]["groups"], "groups");
    let mut out = Vec::new();
    for group in groups {
        for rule in vec_of(&group["rules"], "rules") {
            let name = str_of(&rule["alert"], "alert name").to_owned();
            let expr = str_of(&rule["expr"], &name).to_owned();
            out.push((name, expr, rule.clone()));
        }
    }
    out
}

#[test]
fn dashboard_and_alerts_use_only_exported_metrics() {
    let exported = exported_metrics();
    let panels = dashboard_panels();
    let exprs: Vec<String> = panels.iter().flat_map(|(_, e)| e.clone()).collect();
    assert_exported(
        &metric_names_in(&exprs.join("\n")),
        &exported,
        "docker/grafana-dashboard.json",
    );
    let rules = alert_rules();
    let alert_exprs: Vec<&str> = rules.iter().map(|(_, e, _)| e.as_str()).collect();
    assert_exported(
        &metric_names_in(&alert_exprs.join("\n")),
        &exported,
        "docker/prometheus-alerts.yml",
    );
}

#[test]
fn dashboard_shows_throughput_lag_latency_errors_leadership_and_the_slot() {
    let exprs: Vec<String> = dashboard_panels()
        .into_iter()
        .flat_map(|(_, e)| e)
        .collect();
    let has = |needle: &str| exprs.iter().any(|e| e.contains(needle));
    for wanted in [
        "rate(outbox_relay_events_published_total",
        "outbox_relay_replication_lag_bytes",
        "histogram_quantile(0.5, sum by (le) (rate(outbox_relay_commit_to_ack_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(outbox_relay_commit_to_ack_seconds_bucket",
        "outbox_relay_publish_errors_total",
        "outbox_relay_leader",
        "outbox_relay_up",
        "outbox_relay_inflight_events",
        "outbox_relay_slot_wal_status",
    ] {
        assert!(has(wanted), "no dashboard query uses {wanted}: {exprs:#?}");
    }
}

#[test]
fn alerts_cover_down_no_leader_lag_slot_and_errors() {
    let rules = alert_rules();
    let mut names = BTreeSet::new();
    for (name, expr, rule) in &rules {
        assert!(names.insert(name.clone()), "alert {name} defined twice");
        let severity = rule["labels"]["severity"].as_str();
        assert!(
            matches!(severity, Some("warning" | "critical")),
            "{name}: severity {severity:?}"
        );
        assert!(
            rule["annotations"]["summary"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "{name}: no summary"
        );
        if let Some(d) = scalar(&rule["for"]) {
            assert!(seconds(&d) > 0, "{name}: for {d}");
        }
        assert_eq!(
            expr.matches('(').count(),
            expr.matches(')').count(),
            "{name}: unbalanced parentheses in {expr}"
        );
    }
    let find = |needle: &str| {
        rules
            .iter()
            .find(|(_, e, _)| e.contains(needle))
            .unwrap_or_else(|| panic!("no alert expression contains {needle}"))
    };
    find("deriv(outbox_relay_replication_lag_bytes");
    find("outbox_relay_replication_lag_bytes >");
    find(r#"outbox_relay_slot_wal_status{status=~"unreserved|lost"} == 1"#);
    find("absent(outbox_relay_up)");
    find("up{job=");
    find("outbox_relay_publish_errors_total");
    let (name, _, rule) = find("(outbox_relay_leader) == 0");
    let wait = seconds(str_of(&rule["for"], name));
    assert!(
        (60..=300).contains(&wait),
        "{name} waits {wait} s: longer than a takeover (seconds), short enough to matter"
    );
}

#[test]
fn operations_doc_documents_every_exported_metric() {
    let doc = read("docs/operations.md");
    for name in exported_metrics() {
        assert!(
            doc.contains(&format!("`{name}`")),
            "docs/operations.md does not document {name}"
        );
    }
}

/// promtool's unit tests of the alerts, where promtool is installed (Debian: prometheus).
#[test]
fn alert_unit_tests_pass_in_promtool_when_it_is_installed() {
    let test_file = root().join("docker/prometheus-alerts.test.yml");
    assert!(test_file.exists(), "{} is missing", test_file.display());
    let out = match std::process::Command::new("promtool")
        .arg("test")
        .arg("rules")
        .arg(&test_file)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("promtool not runnable ({e}): alert unit tests not run");
            return;
        }
    };
    assert!(
        out.status.success(),
        "promtool test rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// YAML files, compose, Prometheus
// ---------------------------------------------------------------------------------------------

#[test]
fn every_yaml_file_in_docker_parses() {
    let files = files_in("docker", &[".yml", ".yaml"]);
    for wanted in [
        "docker/compose.yaml",
        "docker/k8s-sidecar.yaml",
        "docker/prometheus-alerts.yml",
        "docker/prometheus.yml",
    ] {
        assert!(files.iter().any(|f| f == wanted), "{wanted} is missing");
    }
    for file in files {
        let docs = yaml(&file);
        assert!(!docs.is_empty(), "{file} is empty");
        for (i, doc) in docs.iter().enumerate() {
            assert!(
                doc.as_hash().is_some_and(|h| !h.is_empty()),
                "{file}: document {i} is not a mapping"
            );
        }
    }
}

/// `(source, target)` of a compose short-syntax volume, the source resolved from `docker/`.
fn volume(y: &Yaml) -> (PathBuf, String) {
    let spec = str_of(y, "volume");
    let mut parts = spec.split(':');
    let (Some(src), Some(dst)) = (parts.next(), parts.next()) else {
        panic!("volume {spec:?} is not source:target");
    };
    (root().join("docker").join(src), dst.to_owned())
}

fn canonical(p: &Path) -> PathBuf {
    p.canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn compose_runs_postgres_with_logical_wal_kafka_the_relay_and_prometheus() {
    let doc = &yaml("docker/compose.yaml")[0];
    let services = &doc["services"];
    for s in ["postgres", "kafka", "relay", "prometheus"] {
        assert!(!services[s].is_badvalue(), "compose has no {s} service");
    }

    // PostgreSQL 15 with wal_level=logical, the migrations as init scripts.
    let postgres = &services["postgres"];
    assert!(str_of(&postgres["image"], "postgres image").starts_with("postgres:15"));
    let command: Vec<&str> = vec_of(&postgres["command"], "postgres command")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    let wal = command.iter().position(|a| *a == "wal_level=logical");
    assert!(
        wal.is_some_and(|i| i > 0 && command[i - 1] == "-c"),
        "postgres command does not set -c wal_level=logical: {command:?}"
    );
    let mut init_scripts = Vec::new();
    for v in vec_of(&postgres["volumes"], "postgres volumes") {
        let (src, dst) = volume(v);
        assert!(
            src.exists(),
            "postgres mounts {} which does not exist",
            src.display()
        );
        if dst.starts_with("/docker-entrypoint-initdb.d/") {
            init_scripts.push((dst, canonical(&src)));
        }
    }
    for migration in files_in("migrations", &[".sql"]) {
        let file = canonical(&root().join(&migration));
        assert!(
            init_scripts.iter().any(|(_, src)| *src == file),
            "{migration} is not mounted into /docker-entrypoint-initdb.d"
        );
    }
    // The entrypoint runs them in name order, which must be the migrations' order (the table
    // before the role that is granted it).
    let order: Vec<&String> = files_in("migrations", &[".sql"])
        .iter()
        .map(|m| canonical(&root().join(m)))
        .map(|file| &init_scripts.iter().find(|(_, src)| *src == file).unwrap().0)
        .collect();
    assert!(
        order.is_sorted(),
        "init scripts run in another order: {order:?}"
    );

    // The relay: built from the Dockerfile, its config mounted where the image looks.
    let relay = &services["relay"];
    let context = root()
        .join("docker")
        .join(str_of(&relay["build"]["context"], "relay build context"));
    let dockerfile = context.join(str_of(&relay["build"]["dockerfile"], "relay dockerfile"));
    assert_eq!(
        canonical(&dockerfile),
        canonical(&root().join("docker/Dockerfile"))
    );
    let image = dockerfile_facts();
    let (config_src, _) = vec_of(&relay["volumes"], "relay volumes")
        .iter()
        .map(volume)
        .find(|(_, dst)| *dst == image.config_path)
        .unwrap_or_else(|| panic!("no relay volume mounts {}", image.config_path));
    let config_text = std::fs::read_to_string(&config_src).expect("relay config");
    let env: BTreeSet<String> = relay["environment"]
        .as_hash()
        .expect("relay environment (a mapping)")
        .keys()
        .map(|k| str_of(k, "environment name").to_owned())
        .collect();
    let config = parse_config(&config_text, "docker/relay.toml", &env);
    let listen = config.metrics.listen.as_deref().expect("[metrics] listen");
    assert!(
        listen.starts_with("0.0.0.0:"),
        "{listen}: unreachable from outside the container"
    );
    assert_eq!(port_of(listen), image.exposed_port, "relay.toml vs EXPOSE");

    // It reaches the other services by name, as the role the migrations create.
    let url = &config.postgres.url;
    assert!(url.contains("@postgres:5432/"), "{url}");
    let db = str_of(&postgres["environment"]["POSTGRES_DB"], "POSTGRES_DB");
    assert!(
        url.split('?').next().unwrap().ends_with(&format!("/{db}")),
        "{url} vs {db}"
    );
    assert!(url.starts_with("postgres://outbox_relay:"), "{url}");
    let advertised = str_of(
        &services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"],
        "KAFKA_ADVERTISED_LISTENERS",
    );
    for broker in config.kafka.brokers.split(',') {
        assert!(
            advertised.contains(&format!("//{broker}")),
            "relay brokers {broker} is not among kafka's advertised listeners {advertised}"
        );
    }
    let grace = seconds(&scalar(&relay["stop_grace_period"]).expect("relay stop_grace_period"));
    assert!(
        grace > config.relay.shutdown_timeout_secs,
        "stop_grace_period {grace} s does not cover shutdown_timeout_secs"
    );

    // Prometheus gets its config and the alerts at the paths the config names.
    let prometheus_doc = &yaml("docker/prometheus.yml")[0];
    let mounts: Vec<(PathBuf, String)> = vec_of(&services["prometheus"]["volumes"], "volumes")
        .iter()
        .map(volume)
        .collect();
    let mounted = |dst: &str| {
        mounts
            .iter()
            .find(|(_, d)| d == dst)
            .map(|(s, _)| canonical(s))
    };
    assert_eq!(
        mounted("/etc/prometheus/prometheus.yml"),
        Some(canonical(&root().join("docker/prometheus.yml")))
    );
    for rule_file in vec_of(&prometheus_doc["rule_files"], "rule_files") {
        assert_eq!(
            mounted(str_of(rule_file, "rule file")),
            Some(canonical(&root().join("docker/prometheus-alerts.yml")))
        );
    }
    // ... and scrapes the relay service on the metrics port.
    let job = vec_of(&prometheus_doc["scrape_configs"], "scrape_configs")
        .iter()
        .find(|j| j["job_name"].as_str() == Some("outbox-relay"))
        .expect("an outbox-relay scrape job (the alerts match job=\"outbox-relay\")");
    let statics = job["static_configs"][0]["targets"][0]
        .as_str()
        .map(str::to_owned);
    let dns = job["dns_sd_configs"][0]["names"][0].as_str().map(|n| {
        format!(
            "{n}:{}",
            job["dns_sd_configs"][0]["port"].as_i64().unwrap_or(0)
        )
    });
    let target = statics.or(dns).expect("a static or DNS scrape target");
    assert_eq!(target, format!("relay:{}", port_of(listen)));
}

#[test]
fn k8s_sidecar_probes_the_relay_and_its_config_parses() {
    let docs = yaml("docker/k8s-sidecar.yaml");
    let config_map = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("ConfigMap"))
        .expect("ConfigMap");
    let deployment = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("Deployment"))
        .expect("Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let containers = vec_of(&pod["containers"], "containers");
    let relay = containers
        .iter()
        .find(|c| c["name"].as_str() == Some("outbox-relay"))
        .expect("outbox-relay container");
    assert!(
        containers.len() >= 2,
        "the relay is meant as a sidecar next to the app"
    );

    // The config comes from the ConfigMap, at the path given to --config.
    let args: Vec<&str> = vec_of(&relay["args"], "args")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    let config_path = args
        .iter()
        .position(|a| *a == "--config")
        .map(|i| args[i + 1])
        .expect("--config in args");
    let mount = vec_of(&relay["volumeMounts"], "volumeMounts")
        .iter()
        .find(|m| config_path.starts_with(&format!("{}/", str_of(&m["mountPath"], "mountPath"))))
        .expect("a volume mounted where --config points");
    let volume = vec_of(&pod["volumes"], "volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    assert_eq!(volume["configMap"]["name"], config_map["metadata"]["name"]);
    let key = &config_path[str_of(&mount["mountPath"], "mountPath").len() + 1..];
    let toml = str_of(&config_map["data"][key], "the ConfigMap's config");

    // Every ${VAR} it uses is set on the container; the password from a Secret.
    let env = vec_of(&relay["env"], "env");
    let names: BTreeSet<String> = env
        .iter()
        .map(|e| str_of(&e["name"], "env name").to_owned())
        .collect();
    let config = parse_config(toml, "the ConfigMap's relay.toml", &names);
    for var in env_refs(toml) {
        let e = env
            .iter()
            .find(|e| e["name"].as_str() == Some(var.as_str()))
            .unwrap();
        assert!(
            !e["valueFrom"]["secretKeyRef"]["name"].is_badvalue(),
            "{var} should come from a Secret"
        );
    }

    // Probes on the metrics port: liveness /healthz.
    let listen = config.metrics.listen.as_deref().expect("[metrics] listen");
    assert!(
        listen.starts_with("0.0.0.0:"),
        "{listen}: the kubelet could not reach it"
    );
    let metrics_port = vec_of(&relay["ports"], "ports")
        .iter()
        .find(|p| p["containerPort"].as_i64() == Some(i64::from(port_of(listen))))
        .unwrap_or_else(|| panic!("no containerPort for {listen}"));
    let probe_port_ok = |port: &Yaml| {
        *port == metrics_port["name"] || port.as_i64() == Some(i64::from(port_of(listen)))
    };
    let liveness = &relay["livenessProbe"]["httpGet"];
    assert_eq!(liveness["path"].as_str(), Some("/healthz"));
    assert!(
        probe_port_ok(&liveness["port"]),
        "liveness port {:?}",
        liveness["port"]
    );
    // /readyz is 503 on a standby and while Kafka is away; as a readiness probe in a shared,
    // replicated pod it would pull the app out of its Service and stall every rolling update
    // (the new pod stays standby, so never Ready). The manifest explains this; keep it so.
    let replicas = deployment["spec"]["replicas"].as_i64().unwrap_or(1);
    assert!(
        replicas >= 2,
        "run 2 replicas for HA (one streams, one stands by)"
    );
    let readiness = &relay["readinessProbe"]["httpGet"]["path"];
    assert_ne!(
        readiness.as_str(),
        Some("/readyz"),
        "a readinessProbe on /readyz in a {replicas}-replica pod shared with the app"
    );
    assert!(
        read("docker/k8s-sidecar.yaml").contains("/readyz"),
        "explain /readyz"
    );

    // A stop can flush, the CPU limit is a fraction of a core, the process is not root.
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap_or(30);
    assert!(
        u64::try_from(grace).unwrap() > config.relay.shutdown_timeout_secs,
        "terminationGracePeriodSeconds {grace} does not cover shutdown_timeout_secs"
    );
    let cpu = scalar(&relay["resources"]["limits"]["cpu"]).expect("a CPU limit");
    let cores: f64 = match cpu.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().expect("millicores") / 1000.0,
        None => cpu.parse().expect("cores"),
    };
    assert!(cores > 0.0 && cores < 1.0, "CPU limit {cpu}");
    assert!(!relay["resources"]["requests"]["memory"].is_badvalue());
    assert_eq!(
        relay["securityContext"]["runAsNonRoot"].as_bool(),
        Some(true)
    );
}

// ---------------------------------------------------------------------------------------------
// Dockerfile
// ---------------------------------------------------------------------------------------------

/// What the tests need from the Dockerfile's final stage.
struct DockerfileFacts {
    exposed_port: u16,
    config_path: String,
}

/// Logical instructions (continuations joined, comments dropped), grouped by stage.
fn dockerfile_stages() -> Vec<Vec<String>> {
    let text = read("docker/Dockerfile");
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<Vec<String>> = Vec::new();
    for i in instructions {
        if i.starts_with("FROM ") {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("the Dockerfile starts with FROM")
            .push(i);
    }
    stages
}

fn instruction<'a>(stage: &'a [String], keyword: &str) -> Vec<&'a str> {
    stage
        .iter()
        .filter_map(|i| i.strip_prefix(keyword))
        .filter_map(|rest| rest.strip_prefix(' '))
        .collect()
}

fn dockerfile_facts() -> DockerfileFacts {
    let stages = dockerfile_stages();
    let runtime = stages.last().expect("a stage");
    let exposed_port = instruction(runtime, "EXPOSE")
        .first()
        .expect("EXPOSE")
        .trim()
        .parse()
        .expect("EXPOSE port");
    let cmd: Vec<String> =
        serde_json::from_str(instruction(runtime, "CMD").last().expect("CMD")).expect("CMD [..]");
    let config_path = cmd
        .iter()
        .position(|a| a == "--config")
        .map(|i| cmd[i + 1].clone())
        .expect("CMD passes --config");
    DockerfileFacts {
        exposed_port,
        config_path,
    }
}

#[test]
fn dockerfile_is_multi_stage_small_unprivileged_and_health_checked() {
    let stages = dockerfile_stages();
    assert!(stages.len() >= 2, "not a multi-stage build");
    let (build, runtime) = (&stages[0], stages.last().unwrap());
    let build_packages = instruction(build, "RUN").join(" ");
    for p in ["libssl-dev", "pkg-config", "python3", "make", "g++"] {
        assert!(
            build_packages.split_whitespace().any(|w| w == p),
            "the build stage does not install {p}"
        );
    }
    assert!(build_packages.contains("cargo build --release --locked"));

    let from = instruction(runtime, "FROM")[0];
    assert!(
        from.starts_with("debian:bookworm-slim"),
        "runtime image {from}"
    );
    let runtime_run = instruction(runtime, "RUN").join(" ");
    for p in ["ca-certificates", "libssl3"] {
        assert!(
            runtime_run.split_whitespace().any(|w| w == p),
            "the runtime stage does not install {p}"
        );
    }
    assert!(
        !runtime_run.contains("libssl-dev"),
        "build tools in the runtime image"
    );

    let user = *instruction(runtime, "USER").last().expect("USER");
    let name = user.split(':').next().unwrap();
    assert!(name != "root" && name != "0", "runs as {user}");

    let facts = dockerfile_facts();
    assert_eq!(facts.exposed_port, 9187);
    let health = *instruction(runtime, "HEALTHCHECK")
        .last()
        .expect("HEALTHCHECK");
    assert!(
        health.contains(&format!(":{}/healthz", facts.exposed_port)),
        "HEALTHCHECK does not probe /healthz on the exposed port: {health}"
    );
    if health.contains("curl") {
        assert!(
            runtime_run.split_whitespace().any(|w| w == "curl"),
            "HEALTHCHECK uses curl, which the runtime stage does not install"
        );
    }
    let entrypoint: Vec<String> =
        serde_json::from_str(instruction(runtime, "ENTRYPOINT")[0]).expect("ENTRYPOINT [..]");
    assert_eq!(entrypoint, ["outbox-relay"]);
    assert!(facts.config_path.starts_with("/etc/outbox-relay/"));

    // COPY sources from the build context exist (the context is the repository root).
    for stage in &stages {
        for copy in instruction(stage, "COPY") {
            if copy.starts_with("--from") {
                continue;
            }
            let words: Vec<&str> = copy.split_whitespace().collect();
            for src in &words[..words.len() - 1] {
                assert!(root().join(src).exists(), "COPY {src}: no such file");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// config/relay.example.toml
// ---------------------------------------------------------------------------------------------

/// Serde's view of `ConfigFile`: the path of every field (`postgres.url`, `outbox.table`, ...),
/// collected by deserializing from a stand-in that offers each field the struct asks for.
mod fields {
    use std::cell::RefCell;
    use std::fmt;

    use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};

    #[derive(Debug)]
    pub struct Error(String);

    impl fmt::Display for Error {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for Error {}

    impl de::Error for Error {
        fn custom<T: fmt::Display>(msg: T) -> Self {
            Error(msg.to_string())
        }
    }

    pub struct Collector<'a> {
        pub path: String,
        pub out: &'a RefCell<Vec<String>>,
    }

    fn join(path: &str, name: &str) -> String {
        if path.is_empty() {
            name.to_owned()
        } else {
            format!("{path}.{name}")
        }
    }

    macro_rules! plain {
        ($($method:ident => $visit:ident($($value:expr)?)),* $(,)?) => {
            $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
                visitor.$visit($($value)?)
            })*
        };
    }

    impl<'de> de::Deserializer<'de> for Collector<'_> {
        type Error = Error;

        plain! {
            deserialize_any => visit_str("x"),
            deserialize_bool => visit_bool(false),
            deserialize_i8 => visit_i8(1),
            deserialize_i16 => visit_i16(1),
            deserialize_i32 => visit_i32(1),
            deserialize_i64 => visit_i64(1),
            deserialize_u8 => visit_u8(1),
            deserialize_u16 => visit_u16(1),
            deserialize_u32 => visit_u32(1),
            deserialize_u64 => visit_u64(1),
            deserialize_f32 => visit_f32(1.0),
            deserialize_f64 => visit_f64(1.0),
            deserialize_char => visit_char('x'),
            deserialize_str => visit_str("x"),
            deserialize_string => visit_str("x"),
            deserialize_bytes => visit_bytes(b"x"),
            deserialize_byte_buf => visit_bytes(b"x"),
            deserialize_unit => visit_unit(),
            deserialize_identifier => visit_str("x"),
            deserialize_ignored_any => visit_unit(),
        }

        fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            visitor.visit_some(self)
        }

        fn deserialize_unit_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            visitor: V,
        ) -> Result<V::Value, Error> {
            visitor.visit_unit()
        }

        fn deserialize_newtype_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            visitor: V,
        ) -> Result<V::Value, Error> {
            visitor.visit_newtype_struct(self)
        }

        fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            visitor.visit_seq(One {
                path: self.path,
                out: self.out,
                done: false,
            })
        }

        fn deserialize_tuple<V: Visitor<'de>>(
            self,
            _len: usize,
            visitor: V,
        ) -> Result<V::Value, Error> {
            self.deserialize_seq(visitor)
        }

        fn deserialize_tuple_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            _len: usize,
            visitor: V,
        ) -> Result<V::Value, Error> {
            self.deserialize_seq(visitor)
        }

        fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            // Free-form tables ([kafka.properties]) have no fields to document.
            visitor.visit_map(Fields {
                path: self.path,
                fields: &[],
                next: 0,
                out: self.out,
            })
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Error> {
            visitor.visit_map(Fields {
                path: self.path,
                fields,
                next: 0,
                out: self.out,
            })
        }

        /// A key whose value is one of some words (`delivery`): its first, so the struct
        /// around it goes on; an enum with data fails here, naming itself.
        fn deserialize_enum<V: Visitor<'de>>(
            self,
            name: &'static str,
            variants: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Error> {
            let Some(first) = variants.first() else {
                return Err(Error(format!(
                    "enum {name} at {} has no variants",
                    self.path
                )));
            };
            let word: de::value::StrDeserializer<'_, Error> = (*first).into_deserializer();
            visitor.visit_enum(word)
        }
    }

    struct Fields<'a> {
        path: String,
        fields: &'static [&'static str],
        next: usize,
        out: &'a RefCell<Vec<String>>,
    }

    impl<'de> MapAccess<'de> for Fields<'_> {
        type Error = Error;

        fn next_key_seed<K: DeserializeSeed<'de>>(
            &mut self,
            seed: K,
        ) -> Result<Option<K::Value>, Error> {
            let Some(name) = self.fields.get(self.next) else {
                return Ok(None);
            };
            self.out.borrow_mut().push(join(&self.path, name));
            let key: de::value::StrDeserializer<'_, Error> = name.into_deserializer();
            seed.deserialize(key).map(Some)
        }

        fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
            let name = self.fields[self.next];
            self.next += 1;
            seed.deserialize(Collector {
                path: join(&self.path, name),
                out: self.out,
            })
        }
    }

    /// A sequence of one element, so that the struct inside a list (`[[outbox]]`) is seen.
    struct One<'a> {
        path: String,
        out: &'a RefCell<Vec<String>>,
        done: bool,
    }

    impl<'de> SeqAccess<'de> for One<'_> {
        type Error = Error;

        fn next_element_seed<T: DeserializeSeed<'de>>(
            &mut self,
            seed: T,
        ) -> Result<Option<T::Value>, Error> {
            if std::mem::replace(&mut self.done, true) {
                return Ok(None);
            }
            seed.deserialize(Collector {
                path: self.path.clone(),
                out: self.out,
            })
            .map(Some)
        }
    }
}

/// Every key of the config file, as a dotted path (`relay.stall_timeout_secs`): the fields
/// of the file's shape, `ConfigFile` (`Config` holds the typed values built from it).
fn config_keys() -> Vec<String> {
    use serde::Deserialize;
    let out = RefCell::new(Vec::new());
    outbox_relay::config::ConfigFile::deserialize(fields::Collector {
        path: String::new(),
        out: &out,
    })
    .unwrap_or_else(|e| panic!("collecting Config's fields: {e}"));
    out.into_inner()
}

/// The example with its commented-out optional keys (`# key = value`) and sections
/// (`# [[message]]`) switched on.
fn uncommented_example() -> String {
    read("config/relay.example.toml")
        .lines()
        .map(|line| {
            let Some(rest) = line.strip_prefix("# ") else {
                return line.to_owned();
            };
            let is_key_value = rest.split_once(" = ").is_some_and(|(key, _)| {
                !key.is_empty()
                    && key
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            });
            // An optional section, e.g. `# [[message]]`, is switched on with its keys.
            let is_section = rest.starts_with('[')
                && rest.ends_with(']')
                && rest
                    .trim_matches(|c| c == '[' || c == ']')
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '.' || c == '_');
            if is_key_value || is_section {
                rest.to_owned()
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn all_env() -> BTreeSet<String> {
    ["PGPASSWORD", "KAFKA_PASSWORD"].map(str::to_owned).into()
}

#[test]
fn example_config_names_every_key() {
    let example = read("config/relay.example.toml");
    parse_config(&example, "config/relay.example.toml", &all_env());
    // Switched on, the optional keys must be valid too.
    let full = uncommented_example();
    parse_config(&full, "config/relay.example.toml, uncommented", &all_env());

    let value: toml::Value = toml::from_str(&full).expect("TOML");
    let keys = config_keys();
    for wanted in [
        "postgres.password_file",
        "metrics.listen",
        "relay.shutdown_timeout_secs",
        "outbox.header_columns",
        "kafka.properties",
    ] {
        assert!(keys.iter().any(|k| k == wanted), "field list {keys:?}");
    }
    for key in &keys {
        let mut node = &value;
        for part in key.split('.') {
            if let Some(first) = node.as_array().and_then(|a| a.first()) {
                node = first;
            }
            node = node.get(part).unwrap_or_else(|| {
                panic!("config/relay.example.toml does not name {key} (not even commented out as `# {part} = ...`)")
            });
        }
    }
}

#[test]
fn example_config_shows_the_real_defaults() {
    let example = parse_config(
        &read("config/relay.example.toml"),
        "config/relay.example.toml",
        &all_env(),
    );
    // The example spells out every default: with the required values copied over, a config
    // without any of it must come out the same.
    let mut minimal = minimal_config();
    minimal.postgres.url = example.postgres.url.clone();
    minimal.kafka.brokers = example.kafka.brokers.clone();
    minimal.outbox[0].table = example.outbox[0].table.clone();
    assert_eq!(format!("{example:#?}"), format!("{minimal:#?}"));

    // The librdkafka defaults listed in comments are the relay's.
    let text = read("config/relay.example.toml");
    let listed: Vec<(String, String)> = text
        .lines()
        .skip_while(|l| !l.contains("defaults, which are"))
        .skip(1)
        .map_while(|l| {
            let (k, v) = l.strip_prefix("#   \"")?.split_once("\" = \"")?;
            Some((k.to_owned(), v.split('"').next()?.to_owned()))
        })
        .collect();
    let actual: Vec<(String, String)> = outbox_relay::kafka::producer::DEFAULT_PROPERTIES
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    assert_eq!(listed, actual, "the example's list of producer defaults");
    assert!(actual.contains(&("message.timeout.ms".into(), "0".into())));
}

#[test]
fn example_config_shows_tls_and_secrets() {
    let text = read("config/relay.example.toml");
    for needle in [
        "sslmode",
        "disable",
        "prefer",
        "require",
        "verify-ca",
        "verify-full",
        "sslrootcert",
        "password_file",
        "${PGPASSWORD}",
        "\"security.protocol\" = \"sasl_ssl\"",
        "\"ssl.ca.location\"",
        "\"sasl.mechanism\" = \"SCRAM-SHA-512\"",
        "\"sasl.username\"",
        "\"sasl.password\" = \"${KAFKA_PASSWORD}\"",
    ] {
        assert!(
            text.contains(needle),
            "config/relay.example.toml does not show {needle}"
        );
    }
}

/// The Kafka TLS/SASL lines of the example, under [kafka.properties], are settings this
/// build of librdkafka accepts (it was built with OpenSSL and SCRAM).
#[test]
fn example_kafka_tls_and_sasl_settings_are_accepted_by_librdkafka() {
    use rdkafka::producer::BaseProducer;
    let text = read("config/relay.example.toml");
    let ca = tempfile::NamedTempFile::new().expect("temp file");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    std::fs::write(ca.path(), cert.cert.pem()).expect("write CA");
    let start = text.find("# Kafka over TLS").expect("a Kafka TLS example");
    let mut config = minimal_config().kafka;
    for line in text[start..].lines().skip(1) {
        let Some(setting) = line.strip_prefix("#   \"") else {
            break;
        };
        let (key, value) = setting.split_once("\" = \"").expect("\"key\" = \"value\"");
        let value = value
            .trim_end_matches('"')
            .replace("${KAFKA_PASSWORD}", "secret");
        let value = if key == "ssl.ca.location" {
            ca.path().display().to_string()
        } else {
            value
        };
        config.properties.insert(key.to_owned(), value);
    }
    assert!(config.properties.len() >= 5, "{:?}", config.properties);
    outbox_relay::kafka::producer::client_config(&config, "packaging-test")
        .create::<BaseProducer>()
        .unwrap_or_else(|e| panic!("librdkafka refuses {:?}: {e}", config.properties));
}

// ---------------------------------------------------------------------------------------------
// migrations and README
// ---------------------------------------------------------------------------------------------

#[test]
fn migrations_create_the_table_the_publication_and_a_least_privilege_role() {
    let table = read("migrations/001_outbox.sql");
    let create = &table[table
        .find("CREATE TABLE IF NOT EXISTS public.outbox (")
        .expect("CREATE TABLE public.outbox")..];
    let create = &create[..create.find(");").expect("end of CREATE TABLE")];
    let columns: Vec<&str> = create
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.starts_with("--") && !l.is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let defaults = minimal_config();
    for column in defaults.outbox[0].required_columns() {
        assert!(
            columns.contains(&column),
            "001_outbox.sql lacks column {column} that the default [[outbox]] reads: {columns:?}"
        );
    }
    assert!(
        create
            .lines()
            .map(str::trim)
            .any(|l| l.starts_with("id ") && l.contains("uuid PRIMARY KEY")),
        "the event id is not the primary key: {create}"
    );

    let role = read("migrations/002_relay_role.sql");
    let code: String = role
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    for needle in [
        "CREATE ROLE outbox_relay WITH LOGIN REPLICATION",
        "GRANT SELECT ON public.outbox TO outbox_relay",
        "GRANT USAGE ON SCHEMA public TO outbox_relay",
        "GRANT CONNECT ON DATABASE %I TO outbox_relay",
        &format!(
            "CREATE PUBLICATION {} FOR TABLE public.outbox WITH (publish = 'insert', publish_via_partition_root = true)",
            defaults.postgres.publication
        ),
    ] {
        assert!(
            code.contains(needle),
            "002_relay_role.sql does not run: {needle}"
        );
    }
    // Least privilege: nothing beyond reading the outbox, unless the reader opts in.
    for excess in [
        "SUPERUSER",
        "GRANT ALL",
        "INSERT",
        "UPDATE",
        "DELETE",
        "OWNER TO",
    ] {
        assert!(!code.contains(excess), "002_relay_role.sql runs {excess}");
    }
}

#[test]
fn readme_keeps_the_two_commands_and_the_docs_explain_every_packaging_file() {
    let readme = read("README.md");
    let quick_start = &readme[readme.find("## Quick start").expect("Quick start")..];
    let block = &quick_start[quick_start.find("```sh\n").expect("a sh block") + 6..];
    let block = &block[..block.find("```").unwrap()];
    let commands: Vec<&str> = block
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(commands, ["scripts/demo.sh", "scripts/test.sh"]);
    // The README is one page; the reference for operators is docs/operations.md.
    let doc = read("docs/operations.md");
    for file in files_in("docker", &[""]) {
        assert!(
            doc.contains(&format!("`{file}`")),
            "docs/operations.md does not explain {file}"
        );
    }
    for needle in [
        "/healthz",
        "/readyz",
        "outbox-relay check",
        "outbox-relay status",
        "--json",
    ] {
        assert!(
            doc.contains(needle),
            "docs/operations.md does not mention {needle}"
        );
    }
}
