//! The documentation names only files and folders that exist (issue 17, finding 14): a README
//! that still draws `token_cache.rs` after the code moved to `src/cache/` sends a reader to
//! nothing.
//!
//! Every Markdown file of the repository is read whole (prose, code spans, fenced blocks and
//! diagrams alike) and every token that looks like a repository path must name one:
//!
//! - a path under a top-level folder of the repository (`src/...`, `tests/...`, `infra/...`,
//!   ...; see [`TOP_LEVEL`]) must exist as written, from the root;
//! - any other token with a `/` or a file extension the repository uses (see [`EXTENSIONS`]),
//!   such as `routes.rs`, `modules/keyvault.bicep` or `caller_check/`, must be the end of the
//!   path of some file or folder of the repository (`*` matches within one name).
//!
//! Not repository paths, so not checked: URLs (`https://...`, `api://...`), absolute paths
//! (`/dev/stdin`, `/api/token/{connection}`), and build outputs (`target/`, `dist/`), whose
//! first folder is not in [`TOP_LEVEL`]. The few names a reader creates are [`USER_FILES`].

use std::collections::BTreeSet;
use std::path::Path;

use crate::root;

/// Top-level folders of the repository: a path starting with one is checked from the root.
const TOP_LEVEL: &[&str] = &[
    "bench",
    "docs",
    "doubles",
    "function-health",
    "function-invalidate",
    "function-rotation",
    "function-token",
    "fuzz",
    "infra",
    "scripts",
    "src",
    "tests",
];

/// Extensions of files the repository holds: a token ending in one names a file.
const EXTENSIONS: &[&str] = &[
    "bicep", "json", "md", "mjs", "rs", "svg", "toml", "xml", "yaml",
];

/// Names the documentation uses for files a reader creates, which the repository does not
/// hold; each with the repository file it is made from (which must exist), if any.
const USER_FILES: &[(&str, Option<&str>)] = &[
    // "Running under `func start`": `cp local.settings.json.example local.settings.json`; the
    // copy is the developer's own (and ignored by git), holding their settings.
    ("local.settings.json", Some("local.settings.json.example")),
    // "Step by step", step 6: a parameter file holding a new function key, written by the
    // reader's shell with `umask 077` and deleted after the deployment; never committed.
    ("apim-key.parameters.json", None),
];

/// Paths a document gives in another repository, by document and prefix.
const OTHER_REPOSITORIES: &[(&str, &str)] = &[
    // Where the vendored schemas come from: their paths in SchemaStore's repository.
    ("tests/schemas/README.md", "src/schemas/json/"),
];

/// Folders that are not the repository's own files: tools' and builds' output.
fn skipped(name: &str) -> bool {
    name.starts_with('.') || ["target", "node_modules", "dist"].contains(&name)
}

/// Every file and folder of the repository, as paths from the root with `/` separators
/// (folders with a trailing `/`).
fn repository_paths() -> BTreeSet<String> {
    fn walk(dir: &Path, prefix: &str, paths: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = format!("{prefix}{name}");
            if entry.file_type().unwrap().is_dir() {
                if skipped(&name) {
                    continue;
                }
                paths.insert(format!("{path}/"));
                walk(&entry.path(), &format!("{path}/"), paths);
            } else {
                paths.insert(path);
            }
        }
    }
    let mut paths = BTreeSet::new();
    walk(root(), "", &mut paths);
    paths
}

/// The repository's Markdown files (this test's documents).
fn documents(paths: &BTreeSet<String>) -> Vec<String> {
    paths
        .iter()
        .filter(|path| path.ends_with(".md"))
        .cloned()
        .collect()
}

/// `text` without its URLs (`scheme://...` up to white space, a backtick or a bracket).
fn without_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let scheme_start = rest[..at]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.'))
            .map_or(0, |i| i + 1);
        out.push_str(&rest[..scheme_start]);
        let after = &rest[at + 3..];
        let end = after
            .find(|c: char| c.is_whitespace() || "`'\"()<>[]".contains(c))
            .unwrap_or(after.len());
        out.push(' ');
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Tokens of `text` that look like repository paths: runs of path characters that start with
/// a top-level folder, or hold a `/`, or end in a known extension.
pub fn path_tokens(text: &str) -> BTreeSet<String> {
    let is_path_char = |c: char| c.is_ascii_alphanumeric() || "_-./*".contains(c);
    without_urls(text)
        .split(|c: char| !is_path_char(c))
        // Sentence punctuation is not part of a path (`see src/cache/.`).
        .map(|token| token.trim_end_matches('.'))
        .filter(|token| !token.is_empty() && !token.starts_with('/') && !token.starts_with('.'))
        .filter(|token| {
            let first = token.split('/').next().unwrap_or_default();
            let extension = token.rsplit_once('.').map(|(_, ext)| ext);
            (token.contains('/') && (TOP_LEVEL.contains(&first) || token.ends_with('/')))
                || extension.is_some_and(|ext| EXTENSIONS.contains(&ext))
        })
        .map(str::to_string)
        .collect()
}

/// Whether `pattern` (where `*` matches any run of characters within one name) matches `path`.
fn matches(pattern: &str, path: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = path.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    for (index, part) in parts.iter().enumerate() {
        let last = index == parts.len() - 1;
        let found = if last {
            rest.ends_with(part)
                .then(|| rest.len() - part.len())
                .filter(|at| !rest[..*at].contains('/'))
        } else {
            rest.find(part).filter(|at| !rest[..*at].contains('/'))
        };
        let Some(at) = found else { return false };
        rest = &rest[at + part.len()..];
        if last {
            return true;
        }
    }
    rest.is_empty()
}

/// Whether `token` names something in `paths`: from the root when it starts with a top-level
/// folder, else as the end of some path (a whole name or more).
fn exists(token: &str, paths: &BTreeSet<String>) -> bool {
    let first = token.split('/').next().unwrap_or_default();
    let anchored = TOP_LEVEL.contains(&first);
    paths.iter().any(|path| {
        // A folder named without its trailing slash (`src/cache`) is still that folder.
        let candidates = [path.as_str(), path.trim_end_matches('/')];
        candidates.iter().any(|path| {
            if anchored {
                matches(token, path)
            } else {
                matches(token, path)
                    || path
                        .match_indices('/')
                        .any(|(at, _)| at + 1 < path.len() && matches(token, &path[at + 1..]))
            }
        })
    })
}

/// The tokens of `text` that name nothing in `paths` and are not a reader's own file.
fn missing_paths(text: &str, paths: &BTreeSet<String>) -> Vec<String> {
    path_tokens(text)
        .into_iter()
        .filter(|token| !USER_FILES.iter().any(|(name, _)| name == token))
        .filter(|token| !exists(token, paths))
        .collect()
}

#[test]
fn the_documentation_names_only_files_and_folders_that_exist() {
    let paths = repository_paths();
    let documents = documents(&paths);
    for required in ["README.md", "infra/README.md"] {
        assert!(documents.iter().any(|d| d == required), "{required}");
    }
    for (name, source) in USER_FILES {
        if let Some(source) = source {
            assert!(paths.contains(*source), "{name} is made from {source}");
        }
    }
    // `broker.toml` is the reader's configuration too, but the repository ships one
    // (`infra/broker.toml`) and an example, so the name needs no exception.
    assert!(paths.contains("broker.toml.example") && paths.contains("infra/broker.toml"));
    let mut problems = Vec::new();
    for document in &documents {
        let text = crate::read(document);
        for token in missing_paths(&text, &paths) {
            if OTHER_REPOSITORIES
                .iter()
                .any(|(doc, prefix)| doc == document && token.starts_with(prefix))
            {
                continue;
            }
            problems.push(format!("{document}: `{token}`"));
        }
    }
    assert!(
        problems.is_empty(),
        "the documentation names paths that do not exist:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_check_finds_renamed_files_in_diagrams_and_code_spans() {
    let paths = repository_paths();
    // The data-path diagram as it was before the code moved into folders.
    let stale = "
   routes.rs        request: limits, route ──▶ 4xx JSON errors
   caller_check.rs  who is asking ──▶ 401 / 403
   token_cache.rs   cache keyed by (connection, sorted scopes)
   token_client.rs  OAuth 2.0 client credentials
   secret_source.rs secret cache (TTL) ──▶ Key Vault
";
    assert_eq!(
        missing_paths(stale, &paths),
        ["caller_check.rs", "secret_source.rs", "token_cache.rs"]
    );
    // Code spans and prose alike; folders, globs and paths from the root.
    let text = "See `src/cache/shared.rs`, `caller_check/`, `src/nothing/`, `modules/keyvault.bicep`, \
                `benchmarks-*.svg`, `nothing-*.svg`, tests/deploy/readme.rs and `src/old.rs`.";
    assert_eq!(
        missing_paths(text, &paths),
        ["nothing-*.svg", "src/nothing/", "src/old.rs"]
    );
    // Not repository paths: URLs, absolute paths, build outputs, a reader's own files.
    let text = "`https://login.microsoftonline.com/t/v2.0/x.json` `api://token-broker/` \
                `/dev/stdin` `target/release/token-broker` `dist/token-broker.zip` \
                `local.settings.json` and `apim-key.parameters.json`";
    assert!(
        missing_paths(text, &paths).is_empty(),
        "{:?}",
        path_tokens(text)
    );
}
