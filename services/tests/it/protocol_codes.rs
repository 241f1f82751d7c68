//! Every error code and close code that `docs/protocol.md` lists has a test that makes the
//! server send it and checks what the client received.
//!
//! The check reads the two tables ("Error codes", "Close codes") and the test sources in
//! `services/tests/`, lexed as Rust so that comments never count. A code is tested when some
//! test names it in code:
//!
//! - an error code as a string literal, such as `assert_eq!(error["code"], "not_member")` or
//!   a case `("{not json", "bad_frame", None)`: test clients never send error codes, so such
//!   a literal is an expected answer;
//! - a close code as an integer literal next to the row's reason as a string literal, in the
//!   same parentheses, brackets or braces, such as `(1008, "token expired")` or
//!   `Closed { code: 1009, reason: "frame too large".into() }`. The row whose reason is the
//!   client's own is matched by its code next to any reason the server does not send itself
//!   with that code.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use parley_events::ErrorCode;
use proc_macro2::{Delimiter, TokenStream, TokenTree};

/// Error codes whose triggering tests are being written in another change. Each entry names
/// the file that will hold them; remove it when that file lands.
const COVERED_ELSEWHERE: &[(&str, &str)] = &[
    // A command that gets no outcome within `gateway.command_timeout_secs`.
    ("timeout", "services/tests/it/faults_commands.rs"),
    // The intake refusing a publish, a handler failing every delivery, the store failing a
    // read (the full gateway's HTTP 503 is tested in bad_input.rs).
    ("unavailable", "services/tests/it/faults_commands.rs"),
];

/// Close rows no client can make the server send, with why.
const NOT_TRIGGERABLE: &[(u16, &str)] = &[
    // Sending already failed under the server: the connection was reset (then nobody reads
    // the close frame), or a frame outgrew the write buffer, which the server's own frame
    // limits rule out.
    (1011, "write failed"),
    // The fallback for read errors reading a plain server socket does not produce (TLS,
    // HTTP and URL errors); the known ones have their own codes.
    (1011, "connection error"),
];

struct CloseRow {
    code: u16,
    /// The reasons the server sends with this code; empty when it echoes the client's.
    reasons: Vec<String>,
}

fn protocol_doc() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The table rows of the section titled `title`, as cells.
fn table(doc: &str, title: &str) -> Vec<Vec<String>> {
    let heading = format!("## {title}\n");
    let start = doc
        .find(&heading)
        .unwrap_or_else(|| panic!("docs/protocol.md has no section {title:?}"));
    let section = &doc[start + heading.len()..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    section
        .lines()
        .filter(|line| line.starts_with('|'))
        // The header row and the separator row.
        .skip(2)
        .map(|line| {
            line.trim_matches('|')
                .split('|')
                .map(|cell| cell.trim().to_owned())
                .collect()
        })
        .collect()
}

/// The `backticked` parts of a table cell.
fn backticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

fn error_codes(doc: &str) -> Vec<String> {
    table(doc, "Error codes")
        .iter()
        .map(|row| match backticked(&row[0]).as_slice() {
            [code] => code.clone(),
            _ => panic!("an error code row without one `code`: {row:?}"),
        })
        .collect()
}

fn close_rows(doc: &str) -> Vec<CloseRow> {
    table(doc, "Close codes")
        .iter()
        .map(|row| CloseRow {
            code: row[0]
                .parse()
                .unwrap_or_else(|_| panic!("a close code row without a code: {row:?}")),
            reasons: backticked(&row[1]),
        })
        .collect()
}

/// A literal written in a test's code.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Literal {
    Str(String),
    Int(u64),
}

impl Literal {
    fn of(literal: &proc_macro2::Literal) -> Option<Literal> {
        let text = literal.to_string();
        if let Some(inner) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
            return Some(Literal::Str(inner.to_owned()));
        }
        text.parse().ok().map(Literal::Int)
    }
}

/// For each group of tokens in the test sources (a file's top level, and the inside of each
/// pair of parentheses, brackets or braces), the literals directly in it. Doc comments,
/// which the lexer turns into `#[doc = "…"]`, are left out with the other comments.
fn literal_groups() -> Vec<BTreeSet<Literal>> {
    let mut groups = Vec::new();
    for file in test_sources() {
        let source = std::fs::read_to_string(&file).unwrap();
        let tokens = TokenStream::from_str(&source)
            .unwrap_or_else(|e| panic!("{} does not lex: {e:?}", file.display()));
        collect_groups(tokens, &mut groups);
    }
    groups
}

fn collect_groups(tokens: TokenStream, groups: &mut Vec<BTreeSet<Literal>>) {
    let mut literals = BTreeSet::new();
    for token in tokens {
        match token {
            TokenTree::Literal(literal) => literals.extend(Literal::of(&literal)),
            TokenTree::Group(group) if is_doc_attribute(&group) => {}
            TokenTree::Group(group) => collect_groups(group.stream(), groups),
            TokenTree::Ident(_) | TokenTree::Punct(_) => {}
        }
    }
    groups.push(literals);
}

fn is_doc_attribute(group: &proc_macro2::Group) -> bool {
    group.delimiter() == Delimiter::Bracket
        && matches!(group.stream().into_iter().next(), Some(TokenTree::Ident(i)) if i == "doc")
}

/// Every `.rs` file under `services/tests/`, except this one (its lists name codes too).
fn test_sources() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut files = Vec::new();
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with(file!()) {
                files.push(path);
            }
        }
    }
    assert!(files.len() > 5, "test sources found: {files:?}");
    files
}

fn close_row_tested(row: &CloseRow, rows: &[CloseRow], groups: &[BTreeSet<Literal>]) -> bool {
    let code = Literal::Int(u64::from(row.code));
    if row.reasons.is_empty() {
        let servers_own: BTreeSet<&String> = rows
            .iter()
            .filter(|other| other.code == row.code)
            .flat_map(|other| &other.reasons)
            .collect();
        groups.iter().any(|group| {
            group.contains(&code)
                && group
                    .iter()
                    .any(|l| matches!(l, Literal::Str(s) if !servers_own.contains(s)))
        })
    } else {
        row.reasons
            .iter()
            .filter(|reason| !NOT_TRIGGERABLE.contains(&(row.code, reason.as_str())))
            .all(|reason| groups_with(&code, &Literal::Str(reason.clone()), groups))
    }
}

fn groups_with(a: &Literal, b: &Literal, groups: &[BTreeSet<Literal>]) -> bool {
    groups
        .iter()
        .any(|group| group.contains(a) && group.contains(b))
}

#[test]
fn the_error_code_table_lists_every_error_code() {
    let documented: BTreeSet<String> = error_codes(&protocol_doc()).into_iter().collect();
    let defined: BTreeSet<String> = ErrorCode::ALL
        .iter()
        .map(|code| code.as_str().to_owned())
        .collect();
    assert_eq!(documented, defined);
}

#[test]
fn every_documented_error_code_has_a_test_that_receives_it() {
    let doc = protocol_doc();
    let codes = error_codes(&doc);
    for (code, _) in COVERED_ELSEWHERE {
        assert!(
            codes.iter().any(|c| c == code),
            "{code} is excused but not documented: remove it from COVERED_ELSEWHERE"
        );
    }
    let groups = literal_groups();
    let untested: Vec<&String> = codes
        .iter()
        .filter(|code| !COVERED_ELSEWHERE.iter().any(|(c, _)| c == code))
        .filter(|code| {
            let literal = Literal::Str((*code).clone());
            !groups.iter().any(|group| group.contains(&literal))
        })
        .collect();
    assert!(
        untested.is_empty(),
        "error codes no test receives: {untested:?}"
    );
}

#[test]
fn every_documented_close_code_has_a_test_that_receives_it() {
    let rows = close_rows(&protocol_doc());
    assert!(rows.len() > 5, "the close code table was not found");
    for (code, reason) in NOT_TRIGGERABLE {
        assert!(
            rows.iter()
                .any(|row| row.code == *code && row.reasons.iter().any(|r| r == reason)),
            "{code} {reason:?} is excused but not documented: remove it from NOT_TRIGGERABLE"
        );
    }
    let groups = literal_groups();
    let untested: Vec<String> = rows
        .iter()
        .filter(|row| !close_row_tested(row, &rows, &groups))
        .map(|row| format!("{} {:?}", row.code, row.reasons))
        .collect();
    assert!(
        untested.is_empty(),
        "close codes no test receives (code, reasons): {untested:?}"
    );
}

#[test]
fn comments_and_doc_comments_do_not_count() {
    let mut groups = Vec::new();
    collect_groups(
        TokenStream::from_str(
            "/// \"not_member\"\n// assert_eq!(code, \"not_member\");\n/* (1008, \"token expired\") */\nfn f() { assert_eq!(x, \"bad_frame\"); g((1002, \"protocol error\")) }",
        )
        .unwrap(),
        &mut groups,
    );
    let found = |literal: Literal| groups.iter().any(|group| group.contains(&literal));
    assert!(!found(Literal::Str("not_member".into())));
    assert!(!found(Literal::Str("token expired".into())));
    assert!(found(Literal::Str("bad_frame".into())));
    assert!(groups_with(
        &Literal::Int(1002),
        &Literal::Str("protocol error".into()),
        &groups
    ));
}
