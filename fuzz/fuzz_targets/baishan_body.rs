//! The Baishan submit body (`POST /v2/cache/refresh`, `/v2/cache/prefetch`): JSON whatever the
//! Content-Type says, or a urlencoded form. The handler reads the whole body into bytes and hands
//! them to `parse_submit_body`, as here.
#![no_main]

use cachectl_server::api::baishan::parse_submit_body;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if let Ok((urls, kind)) = parse_submit_body(body) {
        // What the handler does next with the type: trimmed, then matched against url/dir.
        let kind = kind.as_deref().map(str::trim);
        std::hint::black_box((urls.len(), kind));
    }
});
