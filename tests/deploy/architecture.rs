//! The shape docs/development.md promises, checked from the code's own imports: the broker's
//! top-level modules import each other without a circle, `observe/` imports nothing from the
//! rest of the broker, and the doubles' modules import each other without a circle either.
//! Read from the source text (`crate::<module>` paths outside comments), so a new import that
//! breaks the shape fails here rather than in a reviewer's reading.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::root;

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// The top-level module a file belongs to (`src/cache/shared/announcements.rs` is `cache`);
/// `None` for the crate roots.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_string())
}

/// The top-level modules `text` names as `crate::<module>`, comments left out.
fn imported_modules(text: &str) -> BTreeSet<String> {
    let mut modules = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or_default();
        for (start, _) in code.match_indices("crate::") {
            if code[..start].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':') {
                continue; // `token_broker_doubles::` or another crate's path
            }
            let name: String = code[start + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                modules.insert(name);
            }
        }
    }
    modules
}

/// Module -> the modules it imports, for the crate whose sources are under `src`.
fn import_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in rust_files(src) {
        let Some(module) = module_of(src, &file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        let imports = imported_modules(&text);
        let entry = graph.entry(module.clone()).or_default();
        entry.extend(imports.into_iter().filter(|m| *m != module));
    }
    graph
}

/// A circle in `graph`, as the modules along it, if there is one.
fn find_circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut circle = path[at..].to_vec();
            circle.push(node.to_string());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(circle) = visit(next, graph, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_broker_modules_import_each_other_without_a_circle() {
    let graph = import_graph(&root().join("src"));
    // The check sees the imports it is about: the data path's first arrows.
    assert!(graph["routes"].contains("cache"), "{graph:?}");
    assert!(graph["cache"].contains("config"), "{graph:?}");
    assert_eq!(find_circle(&graph), None, "{graph:?}");
}

#[test]
fn observe_imports_nothing_from_the_rest_of_the_broker() {
    let graph = import_graph(&root().join("src"));
    assert_eq!(
        graph["observe"],
        BTreeSet::new(),
        "observe imports {:?}",
        graph["observe"]
    );
    // And the rest reports to it: it is a leaf, not an island.
    assert!(graph["routes"].contains("observe"), "{graph:?}");
}

#[test]
fn the_doubles_import_each_other_without_a_circle() {
    let graph = import_graph(&root().join("doubles/src"));
    assert!(graph["key_vault"].contains("key_vault_keys"), "{graph:?}");
    assert_eq!(find_circle(&graph), None, "{graph:?}");
}

#[test]
fn the_circle_finder_finds_a_circle() {
    let graph = BTreeMap::from([
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["c".to_string()])),
        ("c".to_string(), BTreeSet::from(["a".to_string()])),
    ]);
    assert_eq!(
        find_circle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    assert_eq!(
        imported_modules("use crate::cache::CacheKey; // crate::routes\nx::crate::no"),
        BTreeSet::from(["cache".to_string()])
    );
}
