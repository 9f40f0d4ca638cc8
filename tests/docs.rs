//! The README and docs/ stay whole: every relative link and `#anchor` in README.md and
//! docs/*.md resolves (the file exists; the anchor is a heading of the target file, slugged as
//! GitHub slugs it), and every setting of the reference config, commented out or not, is named
//! in docs/configuration.md.
//!
//! No servers and no Markdown parser: the files are the project's own, so a scanner that knows
//! fenced code blocks, code spans, inline links and link definitions is enough, and this file
//! says exactly what it accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every page of docs/.
fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let docs = std::fs::read_dir(root().join("docs")).expect("read docs/");
    let mut pages: Vec<PathBuf> = docs
        .map(|entry| entry.expect("a docs/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    pages.sort();
    assert!(!pages.is_empty(), "docs/ has no .md page");
    files.extend(pages);
    files
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The file's lines with fenced code blocks (``` or ~~~) blanked out, so line numbers stay.
fn prose_lines(text: &str) -> Vec<String> {
    let mut fence: Option<(char, usize)> = None;
    let mut lines = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        let marker = trimmed.chars().next().filter(|c| *c == '`' || *c == '~');
        let run = marker.map_or(0, |m| trimmed.chars().take_while(|c| *c == m).count());
        match (fence, marker) {
            (Some((open, len)), Some(m)) if m == open && run >= len => {
                fence = None;
                lines.push(String::new());
            }
            (Some(_), _) => lines.push(String::new()),
            (None, Some(m)) if run >= 3 => {
                fence = Some((m, run));
                lines.push(String::new());
            }
            (None, _) => lines.push(line.to_owned()),
        }
    }
    lines
}

/// `text` with every code span (a run of backticks up to the next run of the same length)
/// removed, newlines inside kept; a run with no closing run stays as it is.
fn without_code_spans(text: &str) -> String {
    code_spans(text).0
}

/// The code spans' contents, and the text without them.
fn code_spans(text: &str) -> (String, Vec<String>) {
    let chars: Vec<char> = text.chars().collect();
    let (mut out, mut spans) = (String::new(), Vec::new());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '`' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let run = chars[i..].iter().take_while(|c| **c == '`').count();
        let body_start = i + run;
        let mut j = body_start;
        let mut close = None;
        while j < chars.len() {
            if chars[j] == '`' {
                let other = chars[j..].iter().take_while(|c| **c == '`').count();
                if other == run {
                    close = Some(j);
                    break;
                }
                j += other;
            } else {
                j += 1;
            }
        }
        match close {
            Some(end) => {
                let body: String = chars[body_start..end].iter().collect();
                out.extend(body.chars().filter(|c| *c == '\n'));
                spans.push(body.replace('\n', " ").trim().to_owned());
                i = end + run;
            }
            None => {
                out.extend(&chars[i..body_start]);
                i = body_start;
            }
        }
    }
    (out, spans)
}

/// A heading's text as GitHub renders it: without code-span backticks, emphasis marks and
/// link targets.
fn heading_text(raw: &str) -> String {
    let mut text = String::new();
    let mut rest = raw.trim().trim_end_matches('#').trim_end();
    while let Some(open) = rest.find('[') {
        let Some(mid) = rest[open..].find("](") else {
            break;
        };
        let Some(close) = rest[open + mid..].find(')') else {
            break;
        };
        text.push_str(&rest[..open]);
        text.push_str(&rest[open + 1..open + mid]);
        rest = &rest[open + mid + close + 1..];
    }
    text.push_str(rest);
    text.chars().filter(|c| *c != '`' && *c != '*').collect()
}

/// GitHub's anchor for a heading: lower case, punctuation other than `-` and `_` removed,
/// each space a `-`.
fn slug(heading: &str) -> String {
    heading_text(heading)
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every anchor a file defines: its headings' slugs (a repeated slug gets `-1`, `-2`, ...) and
/// the `id`/`name` of HTML anchors.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut anchors = BTreeSet::new();
    for line in prose_lines(text) {
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if (1..=6).contains(&hashes) && line[hashes..].starts_with(' ') {
            let base = slug(&line[hashes..]);
            let n = seen.entry(base.clone()).or_insert(0);
            anchors.insert(if *n == 0 {
                base.clone()
            } else {
                format!("{base}-{n}")
            });
            *n += 1;
        }
        for attr in [" id=\"", " name=\""] {
            let mut rest = line.as_str();
            while let Some(at) = rest.find(attr) {
                rest = &rest[at + attr.len()..];
                if let Some(end) = rest.find('"') {
                    anchors.insert(rest[..end].to_owned());
                }
            }
        }
    }
    anchors
}

/// Every link target in the file, with its line: inline links and images `[text](target)` and
/// link definitions `[label]: target`, outside code.
fn links(text: &str) -> Vec<(usize, String)> {
    let prose = without_code_spans(&prose_lines(text).join("\n"));
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = prose[from..].find("](") {
        let start = from + at + 2;
        let mut depth = 1;
        let mut end = None;
        for (k, c) in prose[start..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(start + k);
                        break;
                    }
                }
                '\n' => break,
                _ => {}
            }
        }
        let line = prose[..start].matches('\n').count() + 1;
        match end {
            Some(end) => {
                let inside = prose[start..end].trim();
                let target = inside.split_whitespace().next().unwrap_or("");
                found.push((line, target.trim_matches(['<', '>']).to_owned()));
                from = end;
            }
            None => {
                found.push((line, format!("(unclosed link) {}", &prose[start..])));
                from = start;
            }
        }
    }
    for (n, line) in prose.lines().enumerate() {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix('[') {
            if let Some(close) = rest.find("]:") {
                let target = rest[close + 2..].split_whitespace().next().unwrap_or("");
                found.push((n + 1, target.to_owned()));
            }
        }
    }
    found
}

/// Why `target`, linked from `file`, does not resolve; None when it does.
fn broken(file: &Path, target: &str) -> Option<String> {
    let is_url = target.split_once(':').is_some_and(|(scheme, _)| {
        !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
    });
    if is_url || target.starts_with("//") {
        return None;
    }
    let (path, anchor) = match target.split_once('#') {
        Some((path, anchor)) => (path, Some(anchor)),
        None => (target, None),
    };
    if path.is_empty() && anchor.is_none() {
        return Some("an empty link".to_owned());
    }
    let resolved = if path.is_empty() {
        file.to_path_buf()
    } else {
        file.parent().expect("a file's directory").join(path)
    };
    if !resolved.exists() {
        return Some(format!("{} does not exist", resolved.display()));
    }
    let anchor = anchor?;
    if resolved.extension().is_none_or(|ext| ext != "md") {
        return Some(format!(
            "an anchor into {}, which is not Markdown",
            resolved.display()
        ));
    }
    let defined = anchors(&read(&resolved));
    if defined.contains(anchor) {
        None
    } else {
        Some(format!(
            "no heading of {} has the anchor #{anchor}",
            resolved.display()
        ))
    }
}

#[test]
fn every_relative_link_and_anchor_in_the_readme_and_docs_resolves() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in markdown_files() {
        for (line, target) in links(&read(&file)) {
            checked += 1;
            if let Some(why) = broken(&file, &target) {
                let shown = file.strip_prefix(root()).unwrap_or(&file).display();
                problems.push(format!("{shown}:{line}: ({target}): {why}"));
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} links found: is the scanner broken?"
    );
    assert!(
        problems.is_empty(),
        "{} broken link(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// Every setting of `config/outbox-relay.toml` as `section.key` (`[[outbox]]` is `outbox`),
/// commented-out ones included, and every section header as written.
fn reference_config_settings() -> (BTreeSet<String>, BTreeSet<String>) {
    let text = read(&root().join("config/outbox-relay.toml"));
    let (mut sections, mut keys) = (BTreeSet::new(), BTreeSet::new());
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim_start();
        // A commented-out setting is `# key = value`; prose comments are not `word = value`.
        let line = line.strip_prefix('#').map_or(line, str::trim_start);
        let first = line.split_whitespace().next().unwrap_or("");
        let header = first
            .strip_prefix("[[")
            .and_then(|s| s.strip_suffix("]]"))
            .or_else(|| first.strip_prefix('[').and_then(|s| s.strip_suffix(']')));
        if let Some(name) = header.filter(|name| is_path(name)) {
            sections.insert(first.to_owned());
            section = name.to_owned();
            continue;
        }
        let Some((key, value)) = line.split_once(" = ") else {
            continue;
        };
        if is_path(key) && !key.contains('.') && !value.trim().is_empty() && !section.is_empty() {
            keys.insert(format!("{section}.{key}"));
        }
    }
    (sections, keys)
}

fn is_path(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
}

#[test]
fn every_setting_of_the_reference_config_is_named_in_docs_configuration() {
    let (sections, keys) = reference_config_settings();
    for expected in [
        "postgres.url",
        "relay.lease",
        "health.listen",
        "outbox.retention",
        "outbox.declare_exchange",
        "outbox.retry.max_attempts",
        "outbox.columns.routing_key_template",
        "outbox.debezium.route_to",
        "rabbitmq.tls.server_name",
    ] {
        assert!(
            keys.contains(expected),
            "the config scanner missed {expected}: {keys:?}"
        );
    }
    for expected in [
        "[relay]",
        "[[outbox]]",
        "[outbox.columns]",
        "[rabbitmq.tls]",
    ] {
        assert!(
            sections.contains(expected),
            "the config scanner missed {expected}: {sections:?}"
        );
    }

    let page = read(&root().join("docs/configuration.md"));
    let (_, spans) = code_spans(&prose_lines(&page).join("\n"));
    let named: BTreeSet<&str> = spans.iter().map(String::as_str).collect();
    let missing: Vec<&String> = sections
        .iter()
        .chain(&keys)
        .filter(|name| !named.contains(name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not name (as a code span, e.g. `relay.batch_size` or \
         `[relay]`) these settings of config/outbox-relay.toml: {missing:?}"
    );
}

#[test]
fn headings_are_slugged_as_github_slugs_them() {
    assert_eq!(slug(" Try it: two commands"), "try-it-two-commands");
    assert_eq!(slug(" `migrate --adopt`"), "migrate---adopt");
    assert_eq!(
        slug(" Inserting an event, from Rust (sqlx)"),
        "inserting-an-event-from-rust-sqlx"
    );
    assert_eq!(slug(" A key's partition"), "a-keys-partition");
    assert_eq!(
        slug(" The [the outbox](x.md) table_name"),
        "the-the-outbox-table_name"
    );
    let twice = "# Top\n## Growth\n```\n## not a heading\n```\n## Growth\n## Growth\n";
    let found = anchors(twice);
    for anchor in ["top", "growth", "growth-1", "growth-2"] {
        assert!(found.contains(anchor), "{anchor} missing from {found:?}");
    }
    assert!(!found.contains("not-a-heading"), "{found:?}");
}

#[test]
fn links_in_code_are_not_links() {
    let text =
        "See [a](a.md) and `[b](b.md)`.\n```\n[c](c.md)\n```\n[d]: d.md\n[e](<e.md> \"title\")\n";
    let targets: Vec<String> = links(text).into_iter().map(|(_, t)| t).collect();
    assert_eq!(targets, ["a.md", "e.md", "d.md"]);
}
