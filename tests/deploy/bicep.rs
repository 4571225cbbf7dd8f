//! Just enough of a Bicep reader for the deployment checks: no Bicep compiler runs here, so the
//! checks find `resource`, `module`, `param` and `var` declarations and read their bodies.

use std::path::{Path, PathBuf};

use crate::root;

/// A `resource` or `module` declaration: what stands between the keyword and its opening brace
/// (symbol, type or path, `existing`, a condition or loop), and its body without the braces.
#[derive(Debug, Clone)]
pub struct Declaration {
    pub file: PathBuf,
    pub symbol: String,
    /// The resource type without the API version (`Microsoft.Web/sites`), or the module path.
    pub target: String,
    pub header: String,
    pub body: String,
}

impl Declaration {
    pub fn is_existing(&self) -> bool {
        self.header
            .split_whitespace()
            .any(|word| word == "existing")
    }

    /// The value of a `key: value` line directly in the body or nested in it (first match).
    pub fn property(&self, key: &str) -> Option<String> {
        self.body.lines().find_map(|line| {
            line.trim()
                .strip_prefix(key)
                .and_then(|rest| rest.strip_prefix(':'))
                .map(|value| value.trim().to_string())
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "{} `{}` in {}",
            self.target,
            self.symbol,
            self.file.display()
        )
    }
}

/// Every `.bicep` file under `infra/`.
pub fn files() -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "bicep") {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(&root().join("infra"), &mut found);
    found.sort();
    assert!(found.len() >= 5, "infra/ holds the Bicep: {found:?}");
    found
}

/// Full-line comments removed (trailing comments are left: none carries a brace).
fn without_comments(text: &str) -> String {
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `resource` (or `module`) declarations of one file, in order.
pub fn declarations_in(file: &Path, keyword: &str) -> Vec<Declaration> {
    let text = without_comments(&std::fs::read_to_string(file).unwrap());
    let mut found = Vec::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let Some(rest) = line.strip_prefix(&format!("{keyword} ")) else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let symbol = words.next().unwrap().to_string();
        let target = words
            .next()
            .unwrap()
            .trim_matches('\'')
            .split('@')
            .next()
            .unwrap()
            .to_string();
        let equals = start + line.find(" = ").expect("a declaration has ` = `");
        let open = equals + text[equals..].find('{').expect("a body");
        let mut depth = 0usize;
        let mut close = None;
        for (index, character) in text[open..].char_indices() {
            match character {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        close = Some(open + index);
                        break;
                    }
                }
                _ => {}
            }
        }
        let close = close.unwrap_or_else(|| panic!("unbalanced braces in {}", file.display()));
        found.push(Declaration {
            file: file.to_path_buf(),
            symbol,
            target,
            header: text[start..open].to_string(),
            body: text[open + 1..close].to_string(),
        });
    }
    found
}

/// Every resource declaration under `infra/`.
pub fn resources() -> Vec<Declaration> {
    files()
        .iter()
        .flat_map(|file| declarations_in(file, "resource"))
        .collect()
}

/// Resources of one type (without API version) under `infra/`.
pub fn resources_of(target: &str) -> Vec<Declaration> {
    resources()
        .into_iter()
        .filter(|resource| resource.target == target)
        .collect()
}

/// The decorators and declaration of `param <name>` in a file: the lines from the first
/// decorator above it to the declaration itself.
pub fn param(file: &str, name: &str) -> String {
    let text = crate::read(file);
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|line| {
            line.strip_prefix("param ")
                .and_then(|rest| rest.split_whitespace().next())
                == Some(name)
        })
        .unwrap_or_else(|| panic!("{file} declares no param {name}"));
    let first = lines[..at]
        .iter()
        .rposition(|line| !line.starts_with('@'))
        .map_or(0, |blank| blank + 1);
    lines[first..=at].join("\n")
}

/// Strings of a Bicep array literal that starts at `[` in `text`.
pub fn string_array(text: &str) -> Vec<String> {
    let open = text.find('[').expect("an array literal");
    let close = open + text[open..].find(']').expect("a closed array literal");
    text[open + 1..close]
        .split(['\n', ','])
        .map(|item| item.trim().trim_matches('\'').to_string())
        .filter(|item| !item.is_empty())
        .collect()
}

#[test]
fn the_reader_finds_bodies_conditions_and_nested_braces() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.bicep");
    std::fs::write(
        &file,
        "// resource commented 'A/b@1' = {\n\
         resource one 'Microsoft.A/b@2024-01-01' existing = {\n  name: 'x'\n}\n\
         resource two 'Microsoft.A/b/c@2024-01-01' = if (flag) {\n  parent: one\n  properties: {\n    inner: { a: '${x}' }\n  }\n}\n",
    )
    .unwrap();
    let found = declarations_in(&file, "resource");
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found[0].is_existing() && !found[1].is_existing());
    assert_eq!(found[1].target, "Microsoft.A/b/c");
    assert!(found[1].header.contains("if (flag)"));
    assert!(found[1].body.contains("inner: { a: '${x}' }"));
    assert_eq!(found[1].property("parent").as_deref(), Some("one"));
    assert!(!found[0].body.contains("parent"));
}

/// A path under the repository.
pub fn root_file(path: &str) -> PathBuf {
    root().join(path)
}
