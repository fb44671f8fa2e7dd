//! `policy::parse_item` / `parse_item_of`: every submitted URL of every dialect goes through it.
//!
//! Input: a selector byte (bit 0: prefetch, bit 1: directory, bit 2: the first line is the
//! account's domain pattern, parsed by `DomainPattern::parse`), then the URL.
#![no_main]

use cachectl_core::policy::{self, DomainPattern};
use cachectl_core::{ItemType, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let kind = if selector & 1 == 0 { Kind::Refresh } else { Kind::Prefetch };
    let item_type = if selector & 2 == 0 { ItemType::Url } else { ItemType::Dir };
    let (domains, raw) = match text.split_once('\n') {
        Some((pattern, raw)) if selector & 4 != 0 => match DomainPattern::parse(pattern) {
            Ok(p) => (vec![p], raw),
            Err(_) => return,
        },
        _ => (
            vec![
                DomainPattern::parse("example.com").unwrap(),
                DomainPattern::parse("*.example.com").unwrap(),
                DomainPattern::parse("xn--bcher-kva.example").unwrap(),
            ],
            text,
        ),
    };
    let result = if kind == Kind::Refresh {
        policy::parse_item(raw, item_type, &domains)
    } else {
        policy::parse_item_of(kind, raw, item_type, &domains)
    };
    let Ok(item) = result else { return };
    assert_eq!((item.kind, item.item_type), (kind, item_type));
    assert!(policy::any_matches(&domains, item.url.host()), "{item:?} is outside {domains:?}");
    assert!(!item.url.host().bytes().any(|b| b.is_ascii_uppercase()), "{item:?}");
    assert!(!item.url.as_str().contains('#'), "{item:?} kept its fragment");
    assert!(item.url.as_str().len() <= policy::MAX_URL_LEN, "{item:?} is longer than the limit");
    // The stored URL, submitted again, is the same item: normalization is stable.
    let again = policy::parse_item_of(kind, item.url.as_str(), item_type, &domains);
    assert_eq!(again.as_ref(), Ok(&item), "{raw:?} normalized to {:?}, which does not parse to itself", item.url);
});
