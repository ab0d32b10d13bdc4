//! The YAML files in docker/: compose starts PostgreSQL with logical WAL, Kafka, the relay
//! and Prometheus with files that exist; the Kubernetes sidecar probes the relay and its
//! config parses.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use yaml_rust2::Yaml;

use crate::dockerfile::dockerfile_facts;
use crate::files::*;

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
