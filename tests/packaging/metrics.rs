//! The dashboard and the alerts name only metrics the relay exports, and cover what an
//! operator watches; docs/operations.md documents every exported metric.

use std::collections::BTreeSet;

use outbox_relay::ops::metrics::Metrics;
use yaml_rust2::Yaml;

use crate::files::*;

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
