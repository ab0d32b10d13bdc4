//! The source's shape as the developers' guide asks for it: every file opens with a doc
//! comment saying its job, and the `crate::` imports between files form no cycle (data flows
//! one way; the confirmed LSN comes back through one channel, not through an import).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/pipeline/mod.rs` -> `pipeline`, `src/pipeline/ack.rs` -> `pipeline::ack`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file
        .strip_prefix(src)
        .expect("under src/")
        .with_extension("");
    let name = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("::");
    name.strip_suffix("::mod")
        .map_or(name.clone(), str::to_owned)
}

/// The modules each file imports through `crate::`, outside its unit tests and comments.
fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let texts: BTreeMap<String, String> = files
        .iter()
        .map(|f| {
            (
                module_of(&src, f),
                fs::read_to_string(f).expect("read a source file"),
            )
        })
        .collect();
    let mut graph = BTreeMap::new();
    for (module, text) in &texts {
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        let mut deps = BTreeSet::new();
        for line in code.lines() {
            let line = line.split("//").next().unwrap_or("");
            for (at, _) in line.match_indices("crate::") {
                let path: String = line[at + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_' || *c == ':')
                    .collect();
                let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
                // The longest prefix that names a file is the module imported.
                if let Some(dep) = (1..=parts.len())
                    .rev()
                    .map(|k| parts[..k].join("::"))
                    .find(|m| texts.contains_key(m))
                {
                    if &dep != module {
                        deps.insert(dep);
                    }
                }
            }
        }
        graph.insert(module.clone(), deps);
    }
    graph
}

fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        graph: &BTreeMap<String, BTreeSet<String>>,
        node: &str,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_owned(), 1);
        path.push(node.to_owned());
        for dep in graph.get(node).into_iter().flatten() {
            match state.get(dep) {
                Some(1) => {
                    let start = path.iter().position(|p| p == dep).unwrap_or(0);
                    let mut cycle = path[start..].to_vec();
                    cycle.push(dep.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(graph, dep, state, path) {
                        return Some(c);
                    }
                }
            }
        }
        path.pop();
        state.insert(node.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if !state.contains_key(node) {
            if let Some(c) = visit(graph, node, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn the_module_graph_has_no_cycle() {
    let graph = import_graph();
    assert!(graph.len() > 20, "found only {} modules", graph.len());
    assert!(
        graph["pipeline::run"].contains("pipeline::session"),
        "the import scan misses plain `use crate::` lines"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let mut graph = BTreeMap::new();
    graph.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    graph.insert("b".to_owned(), BTreeSet::from(["c".to_owned()]));
    graph.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(find_cycle(&graph).map(|c| c.len()), Some(4));
}

#[test]
fn config_depends_on_no_later_stage() {
    for (module, deps) in import_graph() {
        if module == "config" || module.starts_with("config::") {
            let later: Vec<_> = deps
                .iter()
                .filter(|d| !(d.starts_with("config") || *d == "lsn" || *d == "fxhash"))
                .collect();
            assert!(later.is_empty(), "{module} imports {later:?}");
        }
    }
}

#[test]
fn every_source_file_opens_with_a_doc_comment() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    for file in files {
        let text = fs::read_to_string(&file).expect("read a source file");
        assert!(
            text.starts_with("//!"),
            "{} does not open with a //! comment saying its job",
            file.display()
        );
    }
}
