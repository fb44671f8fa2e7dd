//! The pipelined lane's answer reader (`cachectl_edge::pipeline::parse_answer`): the bytes a
//! Varnish or nginx node writes back on one connection, read the way the lane reads them.
//!
//! Input: one byte saying where the stream is cut into two reads (bits 0-6, a fraction of its
//! length) and whether the node closes the connection after the second (bit 7), then the stream.
//! After each read, answers are taken off the front of the buffer until one is incomplete; an
//! error or an answer that closes the connection ends it, as in the lane.
#![no_main]

use cachectl_edge::pipeline::parse_answer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else { return };
    let closes = cut & 0x80 != 0;
    let split = usize::from(cut & 0x7f) * stream.len() / 127;
    let reads = [&stream[..split], &stream[split..]];
    let mut buffer: Vec<u8> = Vec::new();
    let mut consumed = 0;
    for (i, read) in reads.iter().enumerate() {
        buffer.extend_from_slice(read);
        let eof = closes && i == reads.len() - 1;
        loop {
            let parsed = match parse_answer(&buffer, eof) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => break,
                Err(_) => return,
            };
            assert!(parsed.length > 0 && parsed.length <= buffer.len(), "{parsed:?} of {} bytes", buffer.len());
            // An answer complete before the connection ends is the same answer whatever follows it.
            let later = &stream[consumed + buffer.len()..];
            if !eof && !later.is_empty() {
                let longer = [&buffer[..], later].concat();
                assert_eq!(parse_answer(&longer, false), Ok(Some(parsed_copy(&parsed))));
            }
            consumed += parsed.length;
            buffer.drain(..parsed.length);
            if parsed.close && !parsed.interim {
                return;
            }
            if buffer.is_empty() {
                break;
            }
        }
    }
});

fn parsed_copy(p: &cachectl_edge::pipeline::Parsed) -> cachectl_edge::pipeline::Parsed {
    cachectl_edge::pipeline::Parsed {
        status: p.status,
        length: p.length,
        close: p.close,
        interim: p.interim,
        purged: p.purged,
    }
}
