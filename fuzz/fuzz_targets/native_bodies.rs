//! The native API's request bodies and query strings: `POST /api/v1/tasks` (`SubmitBody`, with
//! its `kind`), and the filters of `GET /api/v1/tasks` and `GET /api/v1/items` through the same
//! `query` function the handlers call.
#![no_main]

use cachectl_core::TaskKind;
use cachectl_core::policy::DomainPattern;
use cachectl_server::api::native::{self, ItemQuery, SubmitBody, TaskQuery};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = serde_json::from_slice::<SubmitBody>(data) {
        let kind = body.kind.as_deref().map(str::parse::<TaskKind>);
        std::hint::black_box((kind.map(|k| k.is_ok()), body.item_type, body.urls.len()));
    }
    let Ok(raw) = std::str::from_utf8(data) else { return };
    if let Ok(filters) = native::query::<TaskQuery>(Some(raw)) {
        if let Some(domain) = filters.domain.as_deref() {
            let _ = DomainPattern::parse(domain);
        }
        std::hint::black_box(filters);
    }
    if let Ok(filters) = native::query::<ItemQuery>(Some(raw)) {
        std::hint::black_box(filters);
    }
});
