//! Tag and regex purge targets (docs/native-api.md, "Tag and regex purges"): what a submitted
//! cache tag or regex may be, and the text an item of either is stored and sent as —
//! `tag:<host>:<tag>` and `regex:<host>:<regex>`, the host lowercase and without a port. Both are
//! scoped to one host of the account: the edges only ever evict that host's objects.
//!
//! A regex is checked here, at submit, so that nothing reaches Varnish (PCRE2) that it would read
//! differently from the `regex` crate, or that could backtrack without end: the accepted dialect
//! is a subset that both engines read the same way over an ASCII path and query.

use crate::model::{ItemType, Kind, NewItem};
use crate::policy::{DomainPattern, UrlError, any_matches, is_dns_name};
use crate::types::ItemUrl;
use regex_syntax::ast::{self, Ast};

/// The longest cache tag accepted, in bytes.
pub const MAX_TAG_LEN: usize = 1024;
/// The longest regex accepted, in bytes.
pub const MAX_REGEX_LEN: usize = 1024;
/// Counted repetitions (`{n,m}`) may not count beyond this.
pub const MAX_REPEAT: u32 = 100;
/// Unbounded repetitions (`*`, `+`, `{n,}`) per regex at most: each one more multiplies what
/// a backtracking engine may try on a path that does not match.
pub const MAX_UNBOUNDED: usize = 3;

/// Paths that every site has in some form: a regex matching all of them is taken to match the
/// whole host, and needs the submitter's explicit confirmation.
const PROBES: [&str; 6] = ["/", "/index.html", "/a/b/c.png?x=1", "/Z9-_.~%20/", "/?q", "/x"];

/// The host of a tag or regex submission, checked against the account's domains.
fn host_of(host: &str, domains: &[DomainPattern]) -> Result<String, UrlError> {
    let host = host.trim().to_ascii_lowercase();
    if !is_dns_name(&host) {
        return Err(UrlError::BadHost);
    }
    if !any_matches(domains, &host) {
        return Err(UrlError::ForeignDomain);
    }
    Ok(host)
}

fn item(item_type: ItemType, host: String, value: &str) -> NewItem {
    let text = format!("{}:{host}:{value}", item_type.as_str());
    NewItem {
        kind: Kind::Refresh,
        url: ItemUrl::accepted(text, host),
        item_type,
        not_before: None,
        depends_on: None,
        soft: false,
    }
}

/// Validates a cache tag of `host`: 1 to 1,024 visible ASCII characters, no comma (tags are
/// separated by blanks in `Surrogate-Key` and by commas in `Cache-Tag`).
///
/// # Errors
/// Why the tag or the host is refused.
pub fn parse_tag(host: &str, tag: &str, domains: &[DomainPattern]) -> Result<NewItem, UrlError> {
    if tag.is_empty() || tag.len() > MAX_TAG_LEN {
        return Err(UrlError::BadTag(format!("a tag has 1 to {MAX_TAG_LEN} bytes")));
    }
    if let Some(c) = tag.chars().find(|c| !c.is_ascii_graphic() || *c == ',') {
        return Err(UrlError::BadTag(format!("{c:?} is not allowed: a tag is visible ASCII without blanks or commas")));
    }
    Ok(item(ItemType::Tag, host_of(host, domains)?, tag))
}

/// Validates a regex over the path and query of `host` (see the module's documentation);
/// one that matches every path needs `confirm_all`.
///
/// # Errors
/// Why the regex or the host is refused.
pub fn parse_regex(host: &str, regex: &str, confirm_all: bool, domains: &[DomainPattern]) -> Result<NewItem, UrlError> {
    check_regex(regex).map_err(UrlError::BadRegex)?;
    let compiled = regex::RegexBuilder::new(regex)
        .size_limit(1 << 20)
        .dfa_size_limit(1 << 20)
        .build()
        .map_err(|e| UrlError::BadRegex(first_line(&e.to_string())))?;
    if !confirm_all && PROBES.iter().all(|p| compiled.is_match(p)) {
        return Err(UrlError::MatchesEverything);
    }
    Ok(item(ItemType::Regex, host_of(host, domains)?, regex))
}

fn first_line(text: &str) -> String {
    text.lines().rfind(|l| !l.trim().is_empty()).unwrap_or(text).trim().to_owned()
}

/// Checks a regex's text and syntax tree against the accepted dialect.
///
/// # Errors
/// What is not accepted, in one sentence.
pub fn check_regex(regex: &str) -> Result<(), String> {
    if regex.len() > MAX_REGEX_LEN {
        return Err(format!("longer than {MAX_REGEX_LEN} bytes"));
    }
    if let Some(c) = regex.chars().find(|c| !c.is_ascii_graphic() || *c == '"') {
        return Err(format!(
            "{c:?} is not allowed: paths are percent-encoded ASCII, write a blank as %20 and a quote as %22"
        ));
    }
    let parsed = ast::parse::ParserBuilder::new()
        .nest_limit(32)
        .build()
        .parse(regex)
        .map_err(|e| format!("{} at byte {}", e.kind(), e.span().start.offset))?;
    let mut unbounded = 0;
    check(&parsed, &mut unbounded)?;
    if unbounded > MAX_UNBOUNDED {
        return Err(format!("more than {MAX_UNBOUNDED} unbounded repetitions (*, +, {{n,}})"));
    }
    Ok(())
}

fn check(node: &Ast, unbounded: &mut usize) -> Result<(), String> {
    match node {
        Ast::Empty(_) | Ast::Dot(_) => Ok(()),
        Ast::Flags(f) => check_flags(&f.flags),
        Ast::Literal(l) => check_literal(l),
        Ast::Assertion(a) => match a.kind {
            ast::AssertionKind::StartLine | ast::AssertionKind::EndLine => Ok(()),
            _ => Err("only the assertions ^ and $ are accepted (\\b, \\A, \\z and the others differ in PCRE2)".into()),
        },
        Ast::ClassUnicode(_) => Err("Unicode classes (\\p, \\P) are not accepted: paths are ASCII".into()),
        Ast::ClassPerl(_) => Err("\\d, \\s and \\w are Unicode classes here and ASCII in PCRE2: \
             write [0-9], [A-Za-z0-9_] or a bracketed class"
            .into()),
        Ast::ClassBracketed(c) => check_class(&c.kind),
        Ast::Repetition(r) => check_repetition(r, unbounded),
        Ast::Group(g) => {
            match &g.kind {
                ast::GroupKind::NonCapturing(flags) => check_flags(flags)?,
                ast::GroupKind::CaptureIndex(_) | ast::GroupKind::CaptureName { .. } => {}
            }
            check(&g.ast, unbounded)
        }
        Ast::Alternation(a) => a.asts.iter().try_for_each(|n| check(n, unbounded)),
        Ast::Concat(c) => c.asts.iter().try_for_each(|n| check(n, unbounded)),
    }
}

fn check_flags(flags: &ast::Flags) -> Result<(), String> {
    for item in &flags.items {
        match item.kind {
            ast::FlagsItemKind::Negation | ast::FlagsItemKind::Flag(ast::Flag::CaseInsensitive) => {}
            _ => return Err("only the flag i (case-insensitive) is accepted".into()),
        }
    }
    Ok(())
}

fn check_literal(literal: &ast::Literal) -> Result<(), String> {
    match literal.kind {
        ast::LiteralKind::Verbatim | ast::LiteralKind::Meta | ast::LiteralKind::Superfluous => Ok(()),
        ast::LiteralKind::HexFixed(_) | ast::LiteralKind::HexBrace(_) if literal.c.is_ascii() => Ok(()),
        ast::LiteralKind::HexFixed(_) | ast::LiteralKind::HexBrace(_) => {
            Err("a hex escape beyond ASCII is not accepted: paths are percent-encoded ASCII".into())
        }
        ast::LiteralKind::Octal => Err("octal escapes are not accepted".into()),
        ast::LiteralKind::Special(_) => {
            Err("escapes such as \\t, \\n and \\v are not accepted (\\v is a class in PCRE2)".into())
        }
    }
}

fn check_class(set: &ast::ClassSet) -> Result<(), String> {
    match set {
        ast::ClassSet::BinaryOp(_) => {
            Err("class operations (&&, --, ~~) are not accepted: PCRE2 reads them as characters".into())
        }
        ast::ClassSet::Item(item) => check_class_item(item),
    }
}

fn check_class_item(item: &ast::ClassSetItem) -> Result<(), String> {
    match item {
        ast::ClassSetItem::Empty(_) | ast::ClassSetItem::Range(_) | ast::ClassSetItem::Ascii(_) => Ok(()),
        ast::ClassSetItem::Literal(l) => check_literal(l),
        ast::ClassSetItem::Unicode(_) | ast::ClassSetItem::Perl(_) => {
            Err("\\d, \\s, \\w and \\p inside a class are not accepted: write the ASCII ranges".into())
        }
        ast::ClassSetItem::Bracketed(_) => Err("nested classes are not accepted: PCRE2 has none".into()),
        ast::ClassSetItem::Union(u) => u.items.iter().try_for_each(check_class_item),
    }
}

fn check_repetition(r: &ast::Repetition, unbounded: &mut usize) -> Result<(), String> {
    let max = match &r.op.kind {
        ast::RepetitionKind::ZeroOrOne => Some(1),
        ast::RepetitionKind::ZeroOrMore | ast::RepetitionKind::OneOrMore => None,
        ast::RepetitionKind::Range(range) => match *range {
            ast::RepetitionRange::Exactly(n) => Some(n),
            ast::RepetitionRange::AtLeast(n) => {
                if n > MAX_REPEAT {
                    return Err(format!("a repetition counts to {MAX_REPEAT} at most"));
                }
                None
            }
            ast::RepetitionRange::Bounded(_, m) => Some(m),
        },
    };
    if max.is_some_and(|m| m > MAX_REPEAT) {
        return Err(format!("a repetition counts to {MAX_REPEAT} at most"));
    }
    if max.is_none() {
        *unbounded += 1;
    }
    if max != Some(1) && has_choice(&r.ast) {
        return Err("a repeated group may not hold another repetition or an alternation: \
             PCRE2 could backtrack exponentially on it"
            .into());
    }
    check(&r.ast, unbounded)
}

/// Whether `node` contains a repetition (beyond `?`) or an alternation.
fn has_choice(node: &Ast) -> bool {
    match node {
        Ast::Repetition(r) => !matches!(r.op.kind, ast::RepetitionKind::ZeroOrOne) || has_choice(&r.ast),
        Ast::Alternation(_) => true,
        Ast::Group(g) => has_choice(&g.ast),
        Ast::Concat(c) => c.asts.iter().any(has_choice),
        _ => false,
    }
}

/// The type, host and value of a tag or regex item's text (`tag:<host>:<tag>`,
/// `regex:<host>:<regex>`); `None` for a URL.
#[must_use]
pub fn split(text: &str) -> Option<(ItemType, &str, &str)> {
    let (kind, rest) = text.split_once(':')?;
    let item_type = match kind {
        "tag" => ItemType::Tag,
        "regex" => ItemType::Regex,
        _ => return None,
    };
    let (host, value) = rest.split_once(':')?;
    Some((item_type, host, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domains() -> Vec<DomainPattern> {
        vec![DomainPattern::parse("*.example.com").unwrap()]
    }

    #[test]
    fn tags_are_host_scoped_tokens() {
        let item = parse_tag("WWW.example.com", "product-42", &domains()).unwrap();
        assert_eq!(item.url.as_str(), "tag:www.example.com:product-42");
        assert_eq!(item.url.host(), "www.example.com");
        assert_eq!(split(item.url.as_str()), Some((ItemType::Tag, "www.example.com", "product-42")));
        assert!(matches!(parse_tag("www.example.com", "a b", &domains()), Err(UrlError::BadTag(_))));
        assert!(matches!(parse_tag("www.example.com", "a,b", &domains()), Err(UrlError::BadTag(_))));
        assert!(matches!(parse_tag("www.example.com", "", &domains()), Err(UrlError::BadTag(_))));
        assert!(matches!(parse_tag("www.example.com", &"x".repeat(1025), &domains()), Err(UrlError::BadTag(_))));
        assert_eq!(parse_tag("www.other.org", "t", &domains()), Err(UrlError::ForeignDomain));
        assert_eq!(parse_tag("www.example.com:80", "t", &domains()), Err(UrlError::BadHost));
    }

    #[test]
    fn regexes_in_the_shared_dialect_are_accepted() {
        for ok in [
            r"^/img/.*\.(png|jpe?g)$",
            r"^/a/[0-9]{1,4}/",
            r"(?i)^/News/",
            r"/thumb/[[:alnum:]_-]+\.webp",
            r"^/p\?id=[0-9]+$",
            r"\x41\/",
        ] {
            let item = parse_regex("www.example.com", ok, false, &domains()).unwrap();
            assert_eq!(split(item.url.as_str()), Some((ItemType::Regex, "www.example.com", ok)));
        }
    }

    #[test]
    fn regexes_outside_it_are_refused_with_a_reason() {
        let refused = |re: &str| match parse_regex("www.example.com", re, false, &domains()) {
            Err(UrlError::BadRegex(reason)) => reason,
            other => panic!("{re}: {other:?}"),
        };
        assert!(refused("(a").contains("unclosed"), "{}", refused("(a"));
        assert!(refused(r"\d+").contains("[0-9]"));
        assert!(refused(r"\bx").contains("assertions"));
        assert!(refused("(a+)+$").contains("backtrack"));
        assert!(refused("(a|aa)*b").contains("backtrack"));
        assert!(refused("a{1000}").contains("at most"));
        assert!(refused("[a-z&&[^aeiou]]").contains("&&"));
        assert!(refused("(?s)a.b").contains("flag i"));
        assert!(refused("/a b").contains("%20"));
        assert!(refused("/é").contains("%20"));
        assert!(refused(r"\pL").contains("Unicode"));
        assert!(refused(r"\t").contains("\\t"));
        assert!(refused(".*a.*b.*c.*d").contains("unbounded"));
        assert!(refused(&"a".repeat(1025)).contains("1024"));
    }

    #[test]
    fn a_regex_matching_everything_needs_confirmation() {
        for all in ["", ".*", "^/", "/", "^/.*$", "(?i)^"] {
            assert_eq!(
                parse_regex("www.example.com", all, false, &domains()),
                Err(UrlError::MatchesEverything),
                "{all}"
            );
            assert!(parse_regex("www.example.com", all, true, &domains()).is_ok(), "{all}");
        }
        assert!(parse_regex("www.example.com", r"\.png$", false, &domains()).is_ok());
    }
}
