//! The rules of a task's items (ARCHITECTURE.md, "The life of a task") as pure functions: item status and progress from node states,
//! retry backoff, domain patterns and URL validation. Nothing here touches the clock or the network.

use crate::model::{ItemStatus, ItemType, Kind, NewItem, NodeState};
use crate::types::ItemUrl;
use rand::Rng;
use std::time::Duration;

/// Item status and progress derived from the states of its nodes: `waiting` until first sent,
/// `failed` as soon as one node failed, `completed` when every node succeeded.
///
/// `started` says whether the item was ever sent to a node: until then it is `waiting`.
#[must_use]
pub fn derive(states: &[NodeState], started: bool) -> (ItemStatus, u8) {
    derive_counts(StateCounts::of(states), started)
}

/// How many of an item's nodes are in each state: what [`derive`] needs, kept up to date in
/// constant time per node result by an item with many nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateCounts {
    /// Nodes not done yet.
    pub pending: usize,
    /// Nodes that succeeded.
    pub succeeded: usize,
    /// Nodes that failed.
    pub failed: usize,
}

impl StateCounts {
    /// The counts of `states`.
    #[must_use]
    pub fn of(states: &[NodeState]) -> Self {
        let mut counts = Self::default();
        for state in states {
            counts.add(*state);
        }
        counts
    }

    /// One more node in `state`.
    pub fn add(&mut self, state: NodeState) {
        match state {
            NodeState::Pending => self.pending += 1,
            NodeState::Succeeded => self.succeeded += 1,
            NodeState::Failed => self.failed += 1,
        }
    }

    /// One node in `state` fewer (it left the item: a drained node never sent the item).
    pub fn remove(&mut self, state: NodeState) {
        match state {
            NodeState::Pending => self.pending = self.pending.saturating_sub(1),
            NodeState::Succeeded => self.succeeded = self.succeeded.saturating_sub(1),
            NodeState::Failed => self.failed = self.failed.saturating_sub(1),
        }
    }

    /// One node from `from` to `to`.
    pub fn change(&mut self, from: NodeState, to: NodeState) {
        match from {
            NodeState::Pending => self.pending = self.pending.saturating_sub(1),
            NodeState::Succeeded => self.succeeded = self.succeeded.saturating_sub(1),
            NodeState::Failed => self.failed = self.failed.saturating_sub(1),
        }
        self.add(to);
    }
}

/// [`derive`] from the counts of the node states.
#[must_use]
pub fn derive_counts(counts: StateCounts, started: bool) -> (ItemStatus, u8) {
    let total = counts.pending + counts.succeeded + counts.failed;
    let done = counts.succeeded + counts.failed;
    let progress = (done * 100).checked_div(total).map_or(100, |p| u8::try_from(p).unwrap_or(100));
    let status = if counts.failed > 0 {
        ItemStatus::Failed
    } else if done == total && started {
        ItemStatus::Completed
    } else if started {
        ItemStatus::Processing
    } else {
        ItemStatus::Waiting
    };
    (status, progress)
}

/// Exponential backoff with full jitter: attempt `n` (from 1) waits a random time in
/// `[base·2ⁿ⁻¹ / 2, base·2ⁿ⁻¹]`, capped at `max`. Half the interval is kept so that a burst of
/// failures still spreads out without ever retrying immediately.
#[must_use]
pub fn backoff(attempt: u32, base: Duration, max: Duration, rng: &mut impl Rng) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let ceiling = exp.min(max);
    let floor = ceiling / 2;
    let span = ceiling.saturating_sub(floor);
    let jitter = if span.is_zero() { Duration::ZERO } else { span.mul_f64(rng.random::<f64>()) };
    floor + jitter
}

/// A domain an account owns or an edge node serves: `www.example.com` exactly, or `*.example.com`
/// for every name below `example.com` (not `example.com` itself, as in DNS and TLS wildcards).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainPattern {
    /// One host name.
    Exact(String),
    /// Every host name that ends with `.suffix`.
    Wildcard(String),
}

impl DomainPattern {
    /// Parses `example.com` or `*.example.com`; host names are compared lowercase.
    ///
    /// # Errors
    /// A description of what is wrong with the pattern.
    pub fn parse(text: &str) -> Result<Self, String> {
        let lower = text.trim().to_ascii_lowercase();
        let (wild, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest.to_owned()),
            None => (false, lower),
        };
        if name.is_empty()
            || name.starts_with('.')
            || name.ends_with('.')
            || name.contains("..")
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return Err(format!("{text:?} is not a domain name or a *.domain wildcard"));
        }
        Ok(if wild { Self::Wildcard(name) } else { Self::Exact(name) })
    }

    /// Whether `host` (lowercase, no port) is covered by this pattern.
    #[must_use]
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(name) => host == name,
            Self::Wildcard(suffix) => {
                host.len() > suffix.len() + 1
                    && host.ends_with(suffix.as_str())
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            }
        }
    }

    /// Whether `host` is this domain or a name under it (used for the GEO dialect's `site`).
    #[must_use]
    pub fn covers_site(&self, site: &str) -> bool {
        match self {
            Self::Exact(name) => site == name,
            Self::Wildcard(suffix) => self.matches(site) || site == suffix,
        }
    }
}

impl std::fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact(name) => f.write_str(name),
            Self::Wildcard(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// Whether any of `patterns` covers `host`.
#[must_use]
pub fn any_matches(patterns: &[DomainPattern], host: &str) -> bool {
    patterns.iter().any(|p| p.matches(host))
}

/// The longest URL accepted, in bytes.
pub const MAX_URL_LEN: usize = 4096;

/// Why a submitted URL was refused (it lands in the dialect's list of rejected URLs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Not an absolute http(s) URL with a host.
    #[error("not an absolute http or https URL")]
    Malformed,
    /// A control character (CR, LF, tab, ...) inside the URL: it would be dropped or smuggled into
    /// the purge request, so the URL would not be the one the caller meant.
    #[error("contains a control character (CR, LF, tab or another below 0x20, or DEL)")]
    ControlCharacter,
    /// The host is not a DNS name: an empty label (`a..example.com`, a trailing dot), a label
    /// longer than 63 bytes, or a character other than letters, digits, `-` (`*.example.com`).
    #[error("the host is not a domain name (labels of letters, digits and '-', none empty, no '*')")]
    BadHost,
    /// Port 0, which no cache listens on.
    #[error("port 0 is not a port")]
    BadPort,
    /// Longer than `MAX_URL_LEN`.
    #[error("longer than {MAX_URL_LEN} bytes")]
    TooLong,
    /// A directory that does not end with `/`.
    #[error("a directory must end with '/'")]
    DirWithoutSlash,
    /// A directory with a query string.
    #[error("a directory cannot have a query string")]
    DirWithQuery,
    /// The host is not one of the account's domains.
    #[error("host is not one of the account's domains")]
    ForeignDomain,
    /// A directory cannot be prefetched.
    #[error("a directory cannot be prefetched")]
    DirNotPrefetchable,
    /// A cache tag that is not a visible ASCII token (see `target::parse_tag`).
    #[error("not a cache tag: {0}")]
    BadTag(String),
    /// A regex outside the accepted dialect (see `target::check_regex`).
    #[error("not an accepted regex: {0}")]
    BadRegex(String),
    /// A regex that matches every path of the host, without `confirm_all`.
    #[error("the regex matches every path of the host; confirm with \"confirm_all\": true (cachectl purge --all)")]
    MatchesEverything,
    /// A soft purge of a directory or regex: Varnish bans always remove.
    #[error(
        "soft purges are for URLs and tags: a directory or regex purge is a Varnish ban, which cannot keep objects stale"
    )]
    SoftBan,
}

/// Validates and normalizes one submitted URL against the account's domains.
///
/// # Errors
/// Why the URL is refused.
pub fn parse_item(raw: &str, item_type: ItemType, domains: &[DomainPattern]) -> Result<NewItem, UrlError> {
    parse_item_of(Kind::Refresh, raw, item_type, domains)
}

/// `parse_item` for an item of `kind`.
///
/// # Errors
/// Why the URL is refused.
pub fn parse_item_of(
    kind: Kind,
    raw: &str,
    item_type: ItemType,
    domains: &[DomainPattern],
) -> Result<NewItem, UrlError> {
    let raw = raw.trim();
    if matches!(item_type, ItemType::Tag | ItemType::Regex) {
        // Tags and regexes are not URLs: `target::parse_tag` and `target::parse_regex`.
        return Err(UrlError::Malformed);
    }
    if raw.len() > MAX_URL_LEN {
        return Err(UrlError::TooLong);
    }
    // The URL parser silently drops tabs and newlines; refuse them instead.
    if raw.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err(UrlError::ControlCharacter);
    }
    let mut url = url::Url::parse(raw).map_err(|_| UrlError::Malformed)?;
    if !matches!(url.scheme(), "http" | "https") || !url.username().is_empty() || url.password().is_some() {
        return Err(UrlError::Malformed);
    }
    let host = match url.host() {
        Some(url::Host::Domain(d)) => d.to_ascii_lowercase(),
        _ => return Err(UrlError::Malformed),
    };
    if !is_dns_name(&host) {
        return Err(UrlError::BadHost);
    }
    if url.port() == Some(0) {
        return Err(UrlError::BadPort);
    }
    url.set_fragment(None);
    // Percent-encoding can make the normalized URL longer than the one submitted; the limit is
    // on what is stored and sent (found by fuzzing).
    if url.as_str().len() > MAX_URL_LEN {
        return Err(UrlError::TooLong);
    }
    if item_type == ItemType::Dir {
        if !url.path().ends_with('/') {
            return Err(UrlError::DirWithoutSlash);
        }
        if url.query().is_some() {
            return Err(UrlError::DirWithQuery);
        }
    }
    if !any_matches(domains, &host) {
        return Err(UrlError::ForeignDomain);
    }
    Ok(NewItem {
        kind,
        url: ItemUrl::accepted(url.to_string(), host),
        item_type,
        not_before: None,
        depends_on: None,
        soft: false,
    })
}

/// Whether `host` (lowercase ASCII, as the URL parser gives it after IDNA) is a DNS name:
/// dot-separated labels of 1 to 63 letters, digits or `-`.
pub(crate) fn is_dns_name(host: &str) -> bool {
    host.len() <= 253
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len()) && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn status_follows_the_node_results() {
        use NodeState::{Failed, Pending, Succeeded};
        assert_eq!(derive(&[Pending, Pending], false), (ItemStatus::Waiting, 0));
        assert_eq!(derive(&[Succeeded, Pending, Pending], true), (ItemStatus::Processing, 33));
        assert_eq!(derive(&[Succeeded, Succeeded], true), (ItemStatus::Completed, 100));
        assert_eq!(derive(&[Failed, Pending], true), (ItemStatus::Failed, 50));
        assert_eq!(derive(&[], true), (ItemStatus::Completed, 100));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for attempt in 1..30 {
            let d = backoff(attempt, base, max, &mut rng);
            let ceiling = (base * 2u32.pow((attempt - 1).min(20))).min(max);
            assert!(d <= ceiling && d >= ceiling / 2, "attempt {attempt}: {d:?}");
        }
    }

    #[test]
    fn domain_patterns() {
        let exact = DomainPattern::parse("WWW.Example.com").unwrap();
        assert!(exact.matches("www.example.com"));
        assert!(!exact.matches("a.www.example.com"));
        let wild = DomainPattern::parse("*.example.com").unwrap();
        assert!(wild.matches("a.example.com"));
        assert!(wild.matches("a.b.example.com"));
        assert!(!wild.matches("example.com"));
        assert!(!wild.matches("badexample.com"));
        assert!(wild.covers_site("example.com"));
        assert!(DomainPattern::parse("*.").is_err());
        assert!(DomainPattern::parse("a b").is_err());
    }

    #[test]
    fn urls_are_validated() {
        let domains =
            vec![DomainPattern::parse("example.com").unwrap(), DomainPattern::parse("*.example.com").unwrap()];
        let item = parse_item("http://WWW.example.com/a?b=1#frag", ItemType::Url, &domains).unwrap();
        assert_eq!(item.url.as_str(), "http://www.example.com/a?b=1");
        assert_eq!(item.url.host(), "www.example.com");
        assert_eq!(parse_item("ftp://example.com/", ItemType::Url, &domains), Err(UrlError::Malformed));
        assert_eq!(parse_item("/relative", ItemType::Url, &domains), Err(UrlError::Malformed));
        assert_eq!(parse_item("http://1.2.3.4/", ItemType::Url, &domains), Err(UrlError::Malformed));
        assert_eq!(parse_item("http://evil.com/", ItemType::Url, &domains), Err(UrlError::ForeignDomain));
        assert_eq!(parse_item("http://example.com/d", ItemType::Dir, &domains), Err(UrlError::DirWithoutSlash));
        assert!(parse_item("http://example.com/d/", ItemType::Dir, &domains).is_ok());
    }

    /// Hosts and characters that a cache would never see as sent: each is refused with its reason
    /// instead of being accepted and purging nothing.
    #[test]
    fn hosts_ports_and_control_characters_are_refused() {
        let domains =
            vec![DomainPattern::parse("example.com").unwrap(), DomainPattern::parse("*.example.com").unwrap()];
        let refused = |raw: &str| parse_item(raw, ItemType::Url, &domains).unwrap_err();
        assert_eq!(refused("http://*.example.com/x"), UrlError::BadHost);
        assert_eq!(refused("http://a..example.com/x"), UrlError::BadHost);
        assert_eq!(refused("http://www.example.com./x"), UrlError::BadHost);
        assert_eq!(refused(&format!("http://{}.example.com/x", "a".repeat(64))), UrlError::BadHost);
        assert_eq!(refused("http://a_b.example.com/x"), UrlError::BadHost);
        assert_eq!(refused("http://www.example.com:0/x"), UrlError::BadPort);
        assert_eq!(refused("http://www.example.com/a\r\nX-Injected: 1"), UrlError::ControlCharacter);
        assert_eq!(refused("http://www.example.com/a\tb"), UrlError::ControlCharacter);
        assert_eq!(refused("http://www.example.com/a\u{7f}"), UrlError::ControlCharacter);
        assert!(parse_item("http://www.example.com:8080/x", ItemType::Url, &domains).is_ok());
        assert!(parse_item(" http://www.example.com/x\n", ItemType::Url, &domains).is_ok());
        assert!(parse_item("http://a-1.example.com/x", ItemType::Url, &domains).is_ok());
    }
}
