//! Purges in an nginx `proxy_cache_path` directory that nginx's cache-purge module cannot do
//! (a directory prefix, a regex, a cache tag): walk the directory, read each cache file's
//! `KEY:` line (and, for a tag, the stored response headers), and delete the files that match.
//!
//! nginx keeps the key of every cached response in its file, after a binary header:
//! `\nKEY: <key>\n`, then the upstream's status line and headers as received. With the shipped
//! configuration the key is `$host$uri$is_args$args`: the host without its port, the decoded,
//! normalized path, and the query as sent. A deleted file is a miss for nginx: the next request
//! goes to the origin and stores a new file (the keys zone's entry for it is replaced then).
//!
//! Memory stays bounded whatever the cache's size: the walk holds one directory iterator per
//! level (`levels=1:2` is three) and one 16 KiB buffer; nothing is collected.

use cachectl_core::ItemType;
use regex::bytes::Regex;
use std::fs::{self, File, ReadDir};
use std::io::{self, Read};
use std::path::Path;

/// How much of a cache file is read: the binary header, the key and the stored headers. nginx
/// itself stores no more headers than `proxy_buffer_size` (4 or 8 KiB by default).
const HEAD: usize = 16 * 1024;

/// The longest regex accepted here (the control plane checks 1,024 at submission).
const REGEX_LIMIT: usize = 1024;

/// Which cache files a purge removes.
#[derive(Debug, Clone)]
pub enum Matcher {
    /// Keys starting with `<host><decoded path prefix>`.
    Prefix(String),
    /// Keys of `host` whose path and query (the rest of the key) matches the regex anywhere,
    /// as a Varnish `req.url ~` ban does.
    Regex {
        /// The host, lower case, no port.
        host: String,
        /// The compiled regex.
        regex: Regex,
    },
    /// Keys of `host` whose stored response carried `tag` in `Surrogate-Key` (space-separated)
    /// or `Cache-Tag` (comma-separated).
    Tag {
        /// The host, lower case, no port.
        host: String,
        /// The tag.
        tag: String,
    },
}

impl Matcher {
    /// The matcher of a directory (`http://host/prefix/`), tag (`tag:<host>:<tag>`) or regex
    /// (`regex:<host>:<regex>`) item.
    ///
    /// # Errors
    /// The item is not one of these, or its regex does not compile within the size limits.
    pub fn for_item(item_type: ItemType, target: &str) -> Result<Self, String> {
        match item_type {
            ItemType::Dir => {
                let url = url::Url::parse(target).map_err(|e| format!("unparsable directory URL: {e}"))?;
                let host = url.host_str().ok_or("a directory URL without a host")?.to_ascii_lowercase();
                let path = percent_decode(url.path());
                Ok(Self::Prefix(format!("{host}{path}")))
            }
            ItemType::Tag | ItemType::Regex => {
                let (kind, host, value) = cachectl_core::target::split(target)
                    .filter(|(t, _, _)| *t == item_type)
                    .ok_or_else(|| format!("unreadable {item_type} item {target:?}"))?;
                let host = host.split(':').next().unwrap_or(host).to_ascii_lowercase();
                if kind == ItemType::Tag {
                    return Ok(Self::Tag { host, tag: value.to_owned() });
                }
                if value.len() > REGEX_LIMIT {
                    return Err(format!("a regex longer than {REGEX_LIMIT} bytes"));
                }
                let regex = regex::bytes::RegexBuilder::new(value)
                    .size_limit(1 << 20)
                    .dfa_size_limit(1 << 20)
                    .build()
                    .map_err(|e| format!("the regex does not compile: {e}"))?;
                Ok(Self::Regex { host, regex })
            }
            ItemType::Url => Err("a URL purge is the cache's own PURGE, not a walk".to_owned()),
        }
    }

    /// Whether the cache file whose key is `key` and whose stored headers are `headers` goes.
    fn matches(&self, key: &[u8], headers: &[u8]) -> bool {
        let (key_host, rest) = split_key(key);
        match self {
            Self::Prefix(prefix) => key.starts_with(prefix.as_bytes()),
            Self::Regex { host, regex } => key_host == host.as_bytes() && regex.is_match(rest),
            Self::Tag { host, tag } => key_host == host.as_bytes() && carries_tag(headers, tag.as_bytes()),
        }
    }
}

/// What a walk did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Walk {
    /// Cache files read.
    pub files: u64,
    /// Cache files deleted.
    pub removed: u64,
}

/// Deletes every cache file under `root` that `matcher` selects.
///
/// # Errors
/// `root` cannot be read. A file that vanishes during the walk (nginx's cache manager removed
/// it) is skipped, not an error.
pub fn purge(root: &Path, matcher: &Matcher) -> io::Result<Walk> {
    let mut walk = Walk::default();
    let mut head = vec![0u8; HEAD];
    let mut stack: Vec<ReadDir> = vec![fs::read_dir(root)?];
    while let Some(dir) = stack.last_mut() {
        let Some(entry) = dir.next() else {
            stack.pop();
            continue;
        };
        let Ok(entry) = entry else { continue };
        let Ok(file_type) = entry.file_type() else { continue };
        let path = entry.path();
        if file_type.is_dir() {
            // nginx's levels are at most three deep; a deeper tree is not a cache directory.
            if stack.len() < 8
                && let Ok(inner) = fs::read_dir(&path)
            {
                stack.push(inner);
            }
            continue;
        }
        // Cache files are named by the key's MD5 in hex; nginx's temporary files carry a suffix.
        if !file_type.is_file() || entry.file_name().as_encoded_bytes().contains(&b'.') {
            continue;
        }
        let Ok(read) = read_head(&path, &mut head) else { continue };
        let Some((key, headers)) = parse_head(&head[..read]) else { continue };
        walk.files += 1;
        if matcher.matches(key, headers) {
            match fs::remove_file(&path) {
                Ok(()) => walk.removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io::Error::new(e.kind(), format!("removing {}: {e}", path.display()))),
            }
        }
    }
    Ok(walk)
}

fn read_head(path: &Path, buf: &mut [u8]) -> io::Result<usize> {
    let mut file = File::open(path)?;
    let mut read = 0;
    while read < buf.len() {
        match file.read(&mut buf[read..])? {
            0 => break,
            n => read += n,
        }
    }
    Ok(read)
}

/// The key and the stored response headers of a cache file's first bytes.
fn parse_head(head: &[u8]) -> Option<(&[u8], &[u8])> {
    const MARK: &[u8] = b"\nKEY: ";
    let start = head.windows(MARK.len()).position(|w| w == MARK)? + MARK.len();
    let len = head[start..].iter().position(|&b| b == b'\n')?;
    let headers = &head[start + len + 1..];
    let end = headers.windows(4).position(|w| w == b"\r\n\r\n").map_or(headers.len(), |p| p + 2);
    Some((&head[start..start + len], &headers[..end]))
}

/// `$host` and the rest of a `$host$uri$is_args$args` key.
fn split_key(key: &[u8]) -> (&[u8], &[u8]) {
    let slash = key.iter().position(|&b| b == b'/').unwrap_or(key.len());
    key.split_at(slash)
}

fn carries_tag(headers: &[u8], tag: &[u8]) -> bool {
    headers.split(|&b| b == b'\n').any(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else { return false };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.eq_ignore_ascii_case(b"surrogate-key") {
            value.split(u8::is_ascii_whitespace).any(|t| t == tag)
        } else if name.eq_ignore_ascii_case(b"cache-tag") {
            value.split(|&b| b == b',').any(|t| t.trim_ascii() == tag)
        } else {
            false
        }
    })
}

/// `%XX` decoded as nginx's `$uri` is (invalid escapes kept as they are).
fn percent_decode(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (bytes.get(i + 1).and_then(hex), bytes.get(i + 2).and_then(hex))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: &u8) -> Option<u8> {
    (*b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file laid out as nginx writes one: a binary header, the key line, the stored headers.
    fn cache_file(dir: &Path, name: &str, key: &str, headers: &str) {
        let mut bytes = vec![0u8; 0x150];
        bytes.extend_from_slice(format!("\nKEY: {key}\nHTTP/1.1 200 OK\r\n{headers}\r\nbody").as_bytes());
        let sub = dir.join(&name[name.len() - 1..]).join(&name[name.len() - 3..name.len() - 1]);
        fs::create_dir_all(&sub).unwrap();
        fs::write(sub.join(name), bytes).unwrap();
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(d).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else {
                    out.push(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn a_directory_purge_removes_that_host_s_prefix_only() {
        let dir = tempfile::tempdir().unwrap();
        cache_file(dir.path(), "a01", "www.example.com/d/x", "");
        cache_file(dir.path(), "a02", "www.example.com/d/y/z?q=1", "");
        cache_file(dir.path(), "a03", "www.example.com/dx", "");
        cache_file(dir.path(), "a04", "img.example.com/d/x", "");
        cache_file(dir.path(), "a05", "www.example.com/d e/x", "");
        cache_file(dir.path(), "a06.0000001", "www.example.com/d/tmp", "");
        let m = Matcher::for_item(ItemType::Dir, "http://WWW.example.com:8080/d/").unwrap();
        assert_eq!(purge(dir.path(), &m).unwrap(), Walk { files: 5, removed: 2 });
        assert_eq!(names(dir.path()), ["a03", "a04", "a05", "a06.0000001"]);
        let m = Matcher::for_item(ItemType::Dir, "http://www.example.com/d%20e/").unwrap();
        assert_eq!(purge(dir.path(), &m).unwrap().removed, 1);
    }

    #[test]
    fn regex_and_tag_purges_stay_on_their_host() {
        let dir = tempfile::tempdir().unwrap();
        cache_file(dir.path(), "b01", "www.example.com/p/1.jpg", "Surrogate-Key: product-1 all\r\n");
        cache_file(dir.path(), "b02", "www.example.com/p/2.png", "cache-tag: a, product-1\r\n");
        cache_file(dir.path(), "b03", "other.test/p/1.jpg", "Surrogate-Key: product-1\r\n");
        cache_file(dir.path(), "b04", "www.example.com/q/1.jpg?x", "Surrogate-Key: product-10\r\n");
        let tag = Matcher::for_item(ItemType::Tag, "tag:www.example.com:product-1").unwrap();
        assert_eq!(purge(dir.path(), &tag).unwrap().removed, 2);
        assert_eq!(names(dir.path()), ["b03", "b04"]);
        let re = Matcher::for_item(ItemType::Regex, r"regex:www.example.com:\.jpg\?").unwrap();
        assert_eq!(purge(dir.path(), &re).unwrap().removed, 1);
        assert_eq!(names(dir.path()), ["b03"]);
        assert!(Matcher::for_item(ItemType::Regex, "regex:a.example.com:(").is_err());
        assert!(Matcher::for_item(ItemType::Url, "http://a.example.com/").is_err());
    }

    #[test]
    fn unreadable_files_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("junk"), b"no key here").unwrap();
        let m = Matcher::for_item(ItemType::Dir, "http://a.example.com/").unwrap();
        assert_eq!(purge(dir.path(), &m).unwrap(), Walk::default());
        assert!(purge(&dir.path().join("missing"), &m).is_err());
    }

    /// 100,000 files in nginx's `levels=1:2` layout: every one read, the matching tenth removed,
    /// with the walk's own state a stack of three directory iterators (see the module docs).
    #[test]
    fn a_hundred_thousand_files() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..100_000u32 {
            let name = format!("{:032x}", u128::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let key =
                if i % 10 == 0 { format!("www.example.com/gone/{i}") } else { format!("www.example.com/kept/{i}") };
            cache_file(dir.path(), &name, &key, "");
        }
        let m = Matcher::for_item(ItemType::Dir, "http://www.example.com/gone/").unwrap();
        assert_eq!(purge(dir.path(), &m).unwrap(), Walk { files: 100_000, removed: 10_000 });
    }
}
