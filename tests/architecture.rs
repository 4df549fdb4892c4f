//! The dependency rule of docs/ARCHITECTURE.md, checked: no import loop between the
//! top-level modules of `src/`.
//!
//! The graph is read from the source text: every `crate::x` path (also inside
//! `use crate::{x, y::z}` groups) and every `super::` that climbs to the crate root,
//! outside comments, string literals and `#[cfg(test)]` items (a test may reach any
//! module it needs to set up). A cycle fails the test with the edges that make it and
//! the files that hold each edge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

#[test]
fn top_level_modules_import_each_other_without_loops() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&src);
    let loops: Vec<String> = cycles(&graph)
        .into_iter()
        .map(|members| {
            let mut text = format!("loop among {}:", members.join(", "));
            for from in &members {
                for (to, files) in &graph[from] {
                    if members.contains(to) {
                        let files: Vec<&str> = files.iter().map(String::as_str).collect();
                        text.push_str(&format!("\n  {from} -> {to} ({})", files.join(", ")));
                    }
                }
            }
            text
        })
        .collect();
    assert!(
        loops.is_empty(),
        "top-level modules import each other in a loop; docs/ARCHITECTURE.md gives the \
         allowed direction (move the shared item to the lower module):\n{}",
        loops.join("\n")
    );
}

#[test]
fn the_reader_sees_grouped_and_relative_paths_and_skips_tests_comments_and_strings() {
    let text = r##"
        use crate::{config::{A, B}, domain};
        use super::pipeline::Stage;
        // crate::commented
        /* crate::blocked /* nested */ crate::still_blocked */
        const S: &str = "the crate::quoted";
        #[serde(with = "crate::report::duration")]
        const R: &str = r#"crate::raw "quoted""#;
        const C: char = '{';
        fn f<'a>(x: &'a str) -> crate::store::Store { todo!() }
        #[cfg(test)]
        use crate::followup::Rule;
        #[cfg(test)]
        mod tests {
            use crate::app::App;
            fn g() { let _ = "}"; }
        }
        fn h() -> crate::output::Format { todo!() }
    "##;
    let found = references(text, 1);
    let expected: BTreeSet<String> = ["config", "domain", "pipeline", "report", "store", "output"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(found, expected);
    // One level down, `super::` is the parent module, not the crate root.
    assert!(!references("use super::deals::Upsert;", 2).contains("deals"));
    assert!(references("use super::super::store::Store;", 2).contains("store"));
}

/// For each top-level module, the modules it names and the files that name them.
fn module_graph(src: &Path) -> Graph {
    let mut graph = Graph::new();
    let files = rust_files(src);
    let test_only = test_only_files(&files);
    for file in files {
        if test_only.contains(&file) {
            continue;
        }
        let relative = file.strip_prefix(src).unwrap();
        let parts: Vec<String> = relative
            .iter()
            .map(|part| part.to_string_lossy().into_owned())
            .collect();
        let top = parts[0].trim_end_matches(".rs").to_owned();
        if parts.len() == 1 && (top == "lib" || top == "main") {
            continue;
        }
        // How many `super::` reach the crate root from this file's module.
        let last = parts.last().unwrap();
        let depth = if last == "mod.rs" {
            parts.len() - 1
        } else {
            parts.len()
        };
        let text = std::fs::read_to_string(&file).unwrap();
        let edges = graph.entry(top.clone()).or_default();
        for name in references(&text, depth) {
            if name != top && is_module(src, &name) {
                edges
                    .entry(name)
                    .or_default()
                    .insert(relative.display().to_string());
            }
        }
    }
    graph
}

/// The files of modules declared `#[cfg(test)] mod name;`.
fn test_only_files(files: &[PathBuf]) -> BTreeSet<PathBuf> {
    const MARK: &str = "#[cfg(test)]";
    let mut test_only = BTreeSet::new();
    for file in files {
        let code = blank_literals(&std::fs::read_to_string(file).unwrap());
        // A `mod.rs` (or the crate root) declares children in its own directory;
        // `name.rs` declares them in `name/`.
        let dir = match file.file_name().unwrap().to_str().unwrap() {
            "mod.rs" | "lib.rs" | "main.rs" => file.parent().unwrap().to_owned(),
            other => file.parent().unwrap().join(other.trim_end_matches(".rs")),
        };
        let mut rest = code.as_str();
        while let Some(at) = rest.find(MARK) {
            rest = after(rest, at + MARK.len());
            let item = rest.trim_start();
            let item = item.strip_prefix("pub(crate) ").unwrap_or(item);
            let Some(declared) = item.strip_prefix("mod ") else {
                continue;
            };
            let name = identifier(declared);
            if after(declared, name.len()).trim_start().starts_with(';') {
                test_only.insert(dir.join(format!("{name}.rs")));
                let nested = dir.join(name);
                if nested.is_dir() {
                    test_only.extend(rust_files(&nested));
                }
            }
        }
    }
    test_only
}

fn is_module(src: &Path, name: &str) -> bool {
    src.join(format!("{name}.rs")).is_file() || src.join(name).join("mod.rs").is_file()
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
    files
}

/// The top-level modules `text` names, for a file `depth` modules below the crate root.
fn references(text: &str, depth: usize) -> BTreeSet<String> {
    let code = without_tests(&blank_literals(text));
    let mut names = BTreeSet::new();
    let climb = "super::".repeat(depth);
    for root in ["crate::".to_owned(), climb] {
        let mut rest = code.as_str();
        while let Some(at) = rest.find(&root) {
            let preceded = before(rest, at)
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':' || c == '$');
            rest = after(rest, at + root.len());
            if preceded {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                names.extend(group_heads(group));
            } else {
                let name = identifier(rest);
                if !name.is_empty() {
                    names.insert(name.to_owned());
                }
            }
        }
    }
    names.remove("self");
    names.remove("super");
    names
}

/// The first segment of each path in a `{a, b::c, d::{e}}` group (the text after `{`).
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut expect_head = true;
    let mut chars = group.char_indices();
    while let Some((index, c)) = chars.next() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => expect_head = true,
            c if expect_head && (c.is_alphabetic() || c == '_') => {
                let name = identifier(after(group, index));
                heads.push(name.to_owned());
                expect_head = false;
                for _ in 1..name.chars().count() {
                    chars.next();
                }
            }
            _ => {}
        }
    }
    heads
}

/// `text` from byte `at` on (empty past its end). Every index here comes from `find`
/// or counts ASCII, so it falls on a character boundary.
fn after(text: &str, at: usize) -> &str {
    text.get(at..).unwrap_or_default()
}

/// `text` up to byte `at`.
fn before(text: &str, at: usize) -> &str {
    text.get(..at).unwrap_or(text)
}

fn identifier(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    before(text, end)
}

/// `text` with comments and the insides of string and char literals replaced by spaces,
/// so braces and paths in them are not seen.
fn blank_literals(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |out: &mut String, from: &[char]| {
        for c in from {
            out.push(if *c == '\n' { '\n' } else { ' ' });
        }
    };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        let word_before = i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
        if c == '/' && next == Some('/') {
            let end = chars[i..]
                .iter()
                .position(|&c| c == '\n')
                .map_or(chars.len(), |n| i + n);
            blank(&mut out, &chars[i..end]);
            i = end;
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            let mut j = i;
            while j < chars.len() {
                if chars[j] == '/' && chars.get(j + 1) == Some(&'*') {
                    depth += 1;
                    j += 2;
                } else if chars[j] == '*' && chars.get(j + 1) == Some(&'/') {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, &chars[i..j.min(chars.len())]);
            i = j;
        } else if c == 'r' && !word_before && matches!(next, Some('#') | Some('"')) {
            let hashes = chars[i + 1..].iter().take_while(|&&c| c == '#').count();
            if chars.get(i + 1 + hashes) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let close: Vec<char> = std::iter::once('"')
                .chain(std::iter::repeat_n('#', hashes))
                .collect();
            let body = i + 2 + hashes;
            let end = (body..chars.len())
                .find(|&j| chars[j..].starts_with(&close))
                .map_or(chars.len(), |j| j + close.len());
            out.push('"');
            blank(&mut out, &chars[i + 1..end.saturating_sub(1)]);
            out.push('"');
            i = end;
        } else if c == '"' {
            let mut j = i + 1;
            while j < chars.len() && chars[j] != '"' {
                j += if chars[j] == '\\' { 2 } else { 1 };
            }
            let body: String = chars[i + 1..j.min(chars.len())].iter().collect();
            out.push('"');
            if body.starts_with("crate::") || body.starts_with("super::") {
                // A path in an attribute (`#[serde(with = "crate::config::duration")]`).
                out.push_str(&body);
            } else {
                blank(&mut out, &chars[i + 1..j.min(chars.len())]);
            }
            out.push('"');
            i = j + 1;
        } else if c == '\'' && next == Some('\\') {
            let end = chars[(i + 3).min(chars.len())..]
                .iter()
                .position(|&c| c == '\'')
                .map_or(chars.len(), |n| i + 3 + n + 1);
            out.push_str("' '");
            i = end;
        } else if c == '\'' && chars.get(i + 2) == Some(&'\'') {
            out.push_str("' '");
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// `code` (literals blanked) without the items marked `#[cfg(test)]`.
fn without_tests(code: &str) -> String {
    const MARK: &str = "#[cfg(test)]";
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find(MARK) {
        out.push_str(before(rest, at));
        let item = after(rest, at + MARK.len());
        let semicolon = item.find(';');
        let brace = item.find('{');
        let end = match (semicolon, brace) {
            (Some(semicolon), Some(brace)) if semicolon < brace => semicolon + 1,
            (_, Some(brace)) => {
                let mut depth = 0;
                let mut end = item.len();
                for (index, c) in after(item, brace).char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = brace + index + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            (Some(semicolon), None) => semicolon + 1,
            (None, None) => item.len(),
        };
        rest = after(item, end);
    }
    out.push_str(rest);
    out
}

/// The strongly connected components of more than one module (Tarjan's algorithm).
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'g>(state: &mut State<'g>, node: &'g str) {
        let n = state.index.len();
        state.index.insert(node, n);
        state.low.insert(node, n);
        state.stack.push(node);
        state.on_stack.insert(node);
        let graph = state.graph;
        if let Some(edges) = graph.get(node) {
            for next in edges.keys() {
                let next = next.as_str();
                if !state.index.contains_key(next) {
                    visit(state, next);
                    let low = state.low[node].min(state.low[next]);
                    state.low.insert(node, low);
                } else if state.on_stack.contains(next) {
                    let low = state.low[node].min(state.index[next]);
                    state.low.insert(node, low);
                }
            }
        }
        if state.low[node] == state.index[node] {
            let mut members = Vec::new();
            loop {
                let member = state.stack.pop().unwrap();
                state.on_stack.remove(member);
                members.push(member.to_owned());
                if member == node {
                    break;
                }
            }
            if members.len() > 1 {
                members.sort();
                state.found.push(members);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for node in graph.keys() {
        if !state.index.contains_key(node.as_str()) {
            visit(&mut state, node);
        }
    }
    state.found
}
