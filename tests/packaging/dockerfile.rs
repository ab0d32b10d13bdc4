//! The Dockerfile: multi-stage, small, unprivileged, health-checked.

use crate::files::*;

/// What the tests need from the Dockerfile's final stage.
pub struct DockerfileFacts {
    pub exposed_port: u16,
    pub config_path: String,
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

pub fn dockerfile_facts() -> DockerfileFacts {
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
