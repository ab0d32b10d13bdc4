//! Shared helpers: reading the repository's files, YAML, ports, env references, and
//! parsing relay configs with the relay's own parser.

use std::collections::BTreeSet;
use std::path::Path;

use outbox_relay::config::Config;
use yaml_rust2::{Yaml, YamlLoader};

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn read(path: &str) -> String {
    let full = root().join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

pub fn yaml(path: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Files in `dir` (relative to the repository) whose names end with one of `exts`, sorted.
pub fn files_in(dir: &str, exts: &[&str]) -> Vec<String> {
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

pub fn str_of<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, found {y:?}"))
}

pub fn vec_of<'a>(y: &'a Yaml, what: &str) -> &'a Vec<Yaml> {
    y.as_vec()
        .unwrap_or_else(|| panic!("{what}: expected a list, found {y:?}"))
}

/// A scalar as text, whatever YAML type it was read as (`9187`, `"9187"`, `true`).
pub fn scalar(y: &Yaml) -> Option<String> {
    match y {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The port of a `host:port` address.
pub fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr:?}"))
}

/// `${VAR}` references in `text`.
pub fn env_refs(text: &str) -> BTreeSet<String> {
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
pub fn parse_config(text: &str, what: &str, env: &BTreeSet<String>) -> Config {
    Config::parse(text, what, |var| {
        env.contains(var).then(|| format!("value-of-{var}"))
    })
    .unwrap_or_else(|e| panic!("{what} does not parse: {e}"))
}

/// The config with nothing but the required keys: every other value is the relay's default.
pub fn minimal_config() -> Config {
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
pub fn seconds(text: &str) -> u64 {
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
