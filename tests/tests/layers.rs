//! The workspace's module structure, checked from its sources: no module circle at any level
//! (top-level modules of a crate, or the modules of one directory module), and no upward
//! import: each crate's modules are in the layers ARCHITECTURE.md states (its "Layers" block,
//! which this test reads), and a module names (`crate::…`, `super::…`, `self::…`) only modules
//! of its own layer or below. Test code (`#[cfg(test)]` modules and blocks) may name anything.
//!
//! It reads `use` trees and paths in the code, with comments left out: cheap, and enough,
//! since every reference to another module of the crate is written as such a path.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The workspace's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

/// A module, by its path in its crate (`["coordinator", "runners"]`; empty: the crate root).
type Module = Vec<String>;

/// A crate's modules (test modules left out) and their code, comments and trailing
/// `#[cfg(test)]` blocks left out.
fn modules(src: &Path) -> BTreeMap<Module, String> {
    let mut files = Vec::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("a source dir") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                if path != src.join("bin") {
                    dirs.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let mut all = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(src).expect("under src");
        let mut module: Module = rel
            .with_extension("")
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        if module.last().is_some_and(|m| m == "mod") {
            module.pop();
        }
        if module == ["lib"] || module == ["main"] {
            module.clear();
        }
        let text = std::fs::read_to_string(&file).expect("a source file");
        all.insert(module, text);
    }
    // Test modules: those declared under #[cfg(test)], and everything below them.
    let mut tests = BTreeSet::new();
    for (module, text) in &all {
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for pair in lines.windows(2) {
            if pair[0] == "#[cfg(test)]"
                && let Some(name) = pair[1]
                    .strip_prefix("pub ")
                    .unwrap_or(pair[1])
                    .strip_prefix("mod ")
                    .and_then(|rest| rest.strip_suffix(';'))
            {
                let mut child = module.clone();
                child.push(name.to_owned());
                tests.insert(child);
            }
        }
    }
    all.into_iter()
        .filter(|(m, _)| !tests.iter().any(|t| m.starts_with(t)))
        .map(|(m, text)| (m, code(&text)))
        .collect()
}

/// `text` without comments and without what follows its first inline `#[cfg(test)]` module
/// (the unit tests, at the end of a file by the house style).
fn code(text: &str) -> String {
    let mut out = String::new();
    let lines: Vec<&str> = text.lines().collect();
    for (n, line) in lines.iter().enumerate() {
        let trimmed = line.trim();
        if trimmed == "#[cfg(test)]"
            && lines
                .get(n + 1)
                .is_some_and(|next| next.trim_start().starts_with("mod ") && next.ends_with('{'))
        {
            break;
        }
        if trimmed.starts_with("//") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The paths a use tree or path starting at `s` names (`a::{b, c::d}` is `a::b` and
/// `a::c::d`), each as its segments; stops where the path ends.
fn paths(s: &str) -> Vec<Vec<String>> {
    fn tree(s: &str, at: &mut usize) -> Vec<Vec<String>> {
        let b = s.as_bytes();
        let mut prefix = Vec::new();
        loop {
            while *at < b.len() && b[*at].is_ascii_whitespace() {
                *at += 1;
            }
            if *at < b.len() && b[*at] == b'{' {
                *at += 1;
                let mut out = Vec::new();
                loop {
                    for mut path in tree(s, at) {
                        let mut full = prefix.clone();
                        full.append(&mut path);
                        out.push(full);
                    }
                    while *at < b.len() && b[*at].is_ascii_whitespace() {
                        *at += 1;
                    }
                    match b.get(*at) {
                        Some(b',') => *at += 1,
                        Some(b'}') => {
                            *at += 1;
                            return out;
                        }
                        _ => return out,
                    }
                    while *at < b.len() && b[*at].is_ascii_whitespace() {
                        *at += 1;
                    }
                    if b.get(*at) == Some(&b'}') {
                        *at += 1;
                        return out;
                    }
                }
            }
            let start = *at;
            while *at < b.len() && (b[*at].is_ascii_alphanumeric() || b[*at] == b'_') {
                *at += 1;
            }
            if *at == start {
                return vec![prefix];
            }
            prefix.push(s[start..*at].to_owned());
            if s[*at..].starts_with("::") {
                *at += 2;
            } else {
                // `x as y` names x.
                let rest = s[*at..].trim_start();
                if let Some(alias) = rest.strip_prefix("as ") {
                    let alias = alias.trim_start();
                    let len = alias
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(alias.len());
                    *at = s.len() - alias.len() + len;
                }
                return vec![prefix];
            }
        }
    }
    tree(s, &mut 0)
}

/// Which modules each module names: `from → to`, resolved to modules of the crate.
fn references(modules: &BTreeMap<Module, String>) -> BTreeSet<(Module, Module)> {
    let mut out = BTreeSet::new();
    for (from, text) in modules {
        for (i, _) in text.match_indices("::") {
            let head_start = text[..i]
                .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(0, |p| p + 1);
            let head = &text[head_start..i];
            let mut base: Module = match head {
                "crate" => Vec::new(),
                "self" => from.clone(),
                "super" => from[..from.len().saturating_sub(1)].to_vec(),
                _ => continue,
            };
            // `super::super::` and `crate::`'s inner `self::` come through the path itself.
            if head_start >= 2 && &text[head_start - 2..head_start] == "::" {
                continue;
            }
            for path in paths(&text[i + 2..]) {
                let mut segments = path.as_slice();
                while let Some(("super", rest)) =
                    segments.split_first().map(|(s, r)| (s.as_str(), r))
                {
                    base.pop();
                    segments = rest;
                }
                let mut to = base.clone();
                to.extend(segments.iter().cloned());
                while !modules.contains_key(&to) {
                    to.pop();
                }
                if to != *from {
                    out.insert((from.clone(), to));
                }
            }
        }
    }
    out
}

/// The sibling edges of `references`: `a::x → a::y::z` is `a::x → a::y`; a module naming its
/// own parent or child is no edge between siblings.
fn sibling_edges(references: &BTreeSet<(Module, Module)>) -> BTreeSet<(Module, Module)> {
    references
        .iter()
        .filter_map(|(from, to)| {
            let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
            (common < from.len() && common < to.len())
                .then(|| (from[..=common].to_vec(), to[..=common].to_vec()))
        })
        .collect()
}

/// A circle of `edges`, if there is one.
fn circle(edges: &BTreeSet<(Module, Module)>) -> Option<Vec<Module>> {
    let mut next: BTreeMap<&Module, Vec<&Module>> = BTreeMap::new();
    for (a, b) in edges {
        next.entry(a).or_default().push(b);
    }
    // Depth-first, with the path on the stack: an edge back into the path closes a circle.
    fn visit<'a>(
        node: &'a Module,
        next: &BTreeMap<&'a Module, Vec<&'a Module>>,
        path: &mut Vec<&'a Module>,
        done: &mut BTreeSet<&'a Module>,
    ) -> Option<Vec<Module>> {
        if let Some(at) = path.iter().position(|m| *m == node) {
            return Some(path[at..].iter().map(|m| (*m).clone()).collect());
        }
        if !done.insert(node) {
            return None;
        }
        path.push(node);
        for to in next.get(node).into_iter().flatten() {
            if let Some(circle) = visit(to, next, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for node in next.keys() {
        let mut path = Vec::new();
        if let Some(circle) = visit(node, &next, &mut path, &mut done) {
            return Some(circle);
        }
    }
    None
}

/// ARCHITECTURE.md's layers: crate dir → its layers, top first, each a set of top-level
/// modules.
fn stated_layers() -> BTreeMap<String, Vec<BTreeSet<String>>> {
    let doc = std::fs::read_to_string(root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let marker = "<!-- layers: tests/tests/layers.rs reads this block -->";
    let block = doc
        .split_once(marker)
        .and_then(|(_, rest)| rest.split_once("```text\n"))
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(block, _)| block)
        .expect("ARCHITECTURE.md states the layers in a text block after the marker");
    block
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let (krate, layers) = line.split_once(':').expect("`crate: a > b c > d`");
            let layers = layers
                .split('>')
                .map(|layer| layer.split_whitespace().map(str::to_owned).collect())
                .collect();
            (krate.trim().to_owned(), layers)
        })
        .collect()
}

fn show(m: &Module) -> String {
    if m.is_empty() {
        "(the crate root)".to_owned()
    } else {
        m.join("::")
    }
}

#[test]
fn no_module_circle_and_no_upward_import_in_any_crate() {
    let layers = stated_layers();
    let crates = ["core", "proto", "api", "server", "runner", "cli"];
    assert_eq!(
        layers.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        crates.iter().copied().filter(|c| *c != "proto").collect(),
        "ARCHITECTURE.md states the layers of every crate with modules"
    );
    let mut problems = Vec::new();
    for krate in crates {
        let modules = modules(&root().join(krate).join("src"));
        let references = references(&modules);
        let siblings = sibling_edges(&references);
        if let Some(circle) = circle(&siblings) {
            let names: Vec<String> = circle.iter().map(show).collect();
            problems.push(format!("{krate}: a module circle: {}", names.join(" → ")));
        }
        let Some(stated) = layers.get(krate) else {
            continue;
        };
        let layer_of = |top: &str| stated.iter().position(|l| l.contains(top));
        let tops: BTreeSet<&String> = modules.keys().filter_map(|m| m.first()).collect();
        for top in &tops {
            if layer_of(top).is_none() {
                problems.push(format!("{krate}: {top} is in no layer of ARCHITECTURE.md"));
            }
        }
        for named in stated.iter().flatten() {
            if !tops.contains(named) {
                problems.push(format!(
                    "{krate}: ARCHITECTURE.md's layers name {named}, which is no module"
                ));
            }
        }
        for (from, to) in &siblings {
            if from.len() != 1 {
                continue;
            }
            if let (Some(a), Some(b)) = (layer_of(&from[0]), layer_of(&to[0]))
                && b < a
            {
                problems.push(format!(
                    "{krate}: {} imports {}, a layer above it",
                    show(from),
                    show(to)
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_check_sees_circles_and_upward_imports() {
    let text = "use crate::{a::{B, c::D}, e as f};\nfn x() { super::g::h(); self::i::J; }";
    assert_eq!(
        paths("{a::{B, c::D}, e as f, g};"),
        [vec!["a", "B"], vec!["a", "c", "D"], vec!["e"], vec!["g"],]
            .map(|p| p.into_iter().map(str::to_owned).collect::<Vec<_>>())
    );
    let m = |s: &str| -> Module {
        if s.is_empty() {
            Vec::new()
        } else {
            s.split("::").map(str::to_owned).collect()
        }
    };
    let mut modules = BTreeMap::new();
    for name in ["", "a", "a::c", "e", "p", "p::g", "p::q", "p::q::i"] {
        modules.insert(m(name), String::new());
    }
    modules.insert(m("p::q"), text.to_owned());
    let refs = references(&modules);
    let want: BTreeSet<(Module, Module)> = [
        (m("p::q"), m("a::c")),
        (m("p::q"), m("a")),
        (m("p::q"), m("e")),
        (m("p::q"), m("p::g")),
        (m("p::q"), m("p::q::i")),
    ]
    .into_iter()
    .collect();
    assert_eq!(refs, want);
    let siblings = sibling_edges(&refs);
    assert!(siblings.contains(&(m("p"), m("a"))));
    assert!(siblings.contains(&(m("p::q"), m("p::g"))));
    assert!(
        !siblings.iter().any(|(_, to)| *to == m("p::q::i")),
        "a child is no sibling"
    );
    assert_eq!(circle(&siblings), None);
    let mut back = siblings.clone();
    back.insert((m("p::g"), m("p::q")));
    assert_eq!(circle(&back), Some(vec![m("p::g"), m("p::q")]));
    // Comments and unit tests name nothing.
    assert_eq!(
        code("use crate::a;\n// crate::b\n#[cfg(test)]\nmod tests {\n    use crate::c;\n}\n"),
        "use crate::a;\n"
    );
}
