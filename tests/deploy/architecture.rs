//! The shape docs/development.md promises, checked from the code's own imports: the broker's
//! top-level modules import each other without a circle, and so do its files (a module's file
//! and its children's included), `observe/` imports nothing from the rest of the broker, and
//! the doubles' modules and files import each other without a circle either.
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

/// Every module of the crate under `src` (`["cache", "memory"]` for `src/cache/memory.rs`,
/// `["cache"]` for `src/cache/mod.rs`) and its file.
fn module_files(src: &Path) -> BTreeMap<Vec<String>, PathBuf> {
    let mut modules = BTreeMap::new();
    for file in rust_files(src) {
        let relative = file.strip_prefix(src).unwrap().with_extension("");
        let mut path: Vec<String> = relative
            .components()
            .map(|c| c.as_os_str().to_str().unwrap().to_string())
            .collect();
        if path.last().is_some_and(|last| last == "mod") {
            path.pop();
        }
        // The crate roots only declare modules (and `main.rs` is a crate of its own); unit
        // test modules may import anything they test.
        if path == ["lib"] || path == ["main"] || path.last().is_some_and(|last| last == "tests") {
            continue;
        }
        modules.insert(path, file);
    }
    modules
}

/// The code of a file: comments and its inline unit tests left out.
fn code_of(text: &str) -> String {
    let text = text
        .split_once("#[cfg(test)]\nmod tests {")
        .map_or(text, |(code, _)| code);
    text.lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The modules (as in [`module_files`]) that the code of module `this` names: `crate::`,
/// `super::` and `self::` paths, the names in their `{...}` groups, and a child module named
/// by its bare name (`use child::...`, `child::f()`), each resolved to the longest module it
/// starts with.
fn file_imports(
    this: &[String],
    code: &str,
    modules: &BTreeMap<Vec<String>, PathBuf>,
) -> BTreeSet<Vec<String>> {
    let resolve = |path: Vec<String>| -> Option<Vec<String>> {
        (0..=path.len())
            .rev()
            .map(|n| path[..n].to_vec())
            .find(|prefix| modules.contains_key(prefix))
    };
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut found = BTreeSet::new();
    for head in ["crate::", "super::", "self::"] {
        for (start, _) in code.match_indices(head) {
            if code[..start].ends_with(|c: char| word(c) || c == ':') {
                continue;
            }
            let mut base: Vec<String> = match head {
                "crate::" => Vec::new(),
                "self::" => this.to_vec(),
                _ => this[..this.len().saturating_sub(1)].to_vec(),
            };
            let rest = &code[start + head.len()..];
            let path_end = rest
                .find(|c: char| !(word(c) || c == ':'))
                .unwrap_or(rest.len());
            let mut segments: Vec<String> = rest[..path_end]
                .split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            while segments.first().is_some_and(|s| s == "super") {
                segments.remove(0);
                base.pop();
            }
            let group = rest[path_end..]
                .strip_prefix('{')
                .and_then(|group| group.split_once('}'))
                .map(|(names, _)| names);
            let mut paths = vec![[base.clone(), segments.clone()].concat()];
            for name in group.into_iter().flat_map(|names| names.split(',')) {
                let name = name.split(" as ").next().unwrap_or_default();
                let name = name.split("::").next().unwrap_or_default().trim();
                if !name.is_empty() && name != "self" {
                    paths.push([base.clone(), segments.clone(), vec![name.to_string()]].concat());
                }
            }
            found.extend(paths.into_iter().filter_map(resolve));
        }
    }
    // A child module named by its bare name (`use child::X`, `child::f()`).
    for (start, _) in code.match_indices("::") {
        let before = &code[..start];
        let name_start = before.rfind(|c: char| !word(c)).map_or(0, |at| at + 1);
        if before[..name_start].ends_with(':') || name_start == start {
            continue;
        }
        let child = [this.to_vec(), vec![before[name_start..].to_string()]].concat();
        if modules.contains_key(&child) {
            found.insert(child);
        }
    }
    found.remove(this);
    found
}

/// File -> the files it imports, by module path (`cache::memory`), for the crate under `src`.
fn file_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let modules = module_files(src);
    let name = |path: &[String]| path.join("::");
    modules
        .iter()
        .map(|(path, file)| {
            let code = code_of(&std::fs::read_to_string(file).unwrap());
            let imports = file_imports(path, &code, &modules);
            (name(path), imports.iter().map(|p| name(p)).collect())
        })
        .collect()
}

#[test]
fn the_broker_files_import_each_other_without_a_circle_parents_and_children_included() {
    let graph = file_graph(&root().join("src"));
    // The check sees the imports it is about: a parent's of its child, a child's of its
    // sibling, a group's names.
    assert!(graph["routes"].contains("routes::token"), "{graph:?}");
    assert!(
        graph["routes::token"].contains("routes::limits"),
        "{graph:?}"
    );
    assert!(graph["cache::shared"].contains("cache::seal"), "{graph:?}");
    assert_eq!(find_circle(&graph), None, "{graph:?}");
}

#[test]
fn the_doubles_files_import_each_other_without_a_circle() {
    let graph = file_graph(&root().join("doubles/src"));
    assert!(graph["key_vault"].contains("key_vault_keys"), "{graph:?}");
    assert_eq!(find_circle(&graph), None, "{graph:?}");
}

#[test]
fn the_file_reader_resolves_parents_groups_and_children() {
    let modules: BTreeMap<Vec<String>, PathBuf> = [
        vec!["a".to_string()],
        vec!["a".to_string(), "b".to_string()],
        vec!["a".to_string(), "c".to_string()],
        vec!["d".to_string()],
    ]
    .into_iter()
    .map(|path| (path, PathBuf::new()))
    .collect();
    let this = vec!["a".to_string(), "b".to_string()];
    let code = code_of(
        "use super::{c::Thing, Other};\nuse crate::d::X; // crate::nothing\n#[cfg(test)]\nmod tests {\nuse crate::a;\n}",
    );
    let found = file_imports(&this, &code, &modules);
    let expected = BTreeSet::from([
        vec!["a".to_string()],
        vec!["a".to_string(), "c".to_string()],
        vec!["d".to_string()],
    ]);
    assert_eq!(found, expected);
    let parent = file_imports(&["a".to_string()], "pub(crate) use b::Thing;", &modules);
    assert_eq!(parent, BTreeSet::from([this.clone()]));
    let call = file_imports(
        &["a".to_string()],
        &code_of("let x = b::f(); // c::g()"),
        &modules,
    );
    assert_eq!(call, BTreeSet::from([this]));
}
