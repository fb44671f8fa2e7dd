use super::*;
use crate::transport::request_bytes;
use tokio::io::AsyncBufReadExt;
use tokio::net::TcpListener;

#[test]
fn parses_answers() {
    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
    assert_eq!(
        parse_answer(ok, false).unwrap(),
        Some(Parsed { status: 200, length: ok.len(), close: false, interim: false, purged: None })
    );
    assert_eq!(parse_answer(&ok[..ok.len() - 1], false).unwrap(), None);
    // Closed in the middle of the body: the status stands, and the connection ends.
    assert_eq!(
        parse_answer(&ok[..ok.len() - 1], true).unwrap(),
        Some(Parsed { status: 200, length: ok.len() - 1, close: true, interim: false, purged: None })
    );
    let two = [&ok[..], b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"].concat();
    assert_eq!(parse_answer(&two, false).unwrap().unwrap().length, ok.len());
    let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-t: 1\r\n\r\nREST";
    let parsed = parse_answer(chunked, false).unwrap().unwrap();
    assert_eq!(parsed.length, chunked.len() - 4);
    assert_eq!(parse_answer(&chunked[..chunked.len() - 6], false).unwrap(), None);
    assert_eq!(parse_answer(&chunked[..chunked.len() - 6], true).unwrap().unwrap().status, 200);
    let close = b"HTTP/1.1 412 Precondition Failed\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
    assert!(parse_answer(close, false).unwrap().unwrap().close);
    let until_eof = b"HTTP/1.0 200 OK\r\n\r\nbody";
    assert_eq!(parse_answer(until_eof, false).unwrap(), None);
    assert_eq!(
        parse_answer(until_eof, true).unwrap(),
        Some(Parsed { status: 200, length: until_eof.len(), close: true, interim: false, purged: None })
    );
    assert!(parse_answer(b"HTTP/1.1 100 Continue\r\n\r\n", false).unwrap().unwrap().interim);
    assert!(parse_answer(b"SSH-2.0-OpenSSH\r\n\r\n", false).is_err());
    assert!(parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false).is_err());
    assert!(parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok", false).is_err());
    let two = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nokk";
    assert!(parse_answer(two, false).is_err(), "two different lengths");
    let same = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok";
    assert_eq!(parse_answer(same, false).unwrap().unwrap().length, same.len());
    // Chunk data must end with CRLF; a size line must start with a hex digit.
    assert!(parse_answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY0\r\n\r\n", false).is_err());
    assert!(parse_answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n", false).is_err());
    // Chunked with a length too: framed by the chunks, and the connection is not reused.
    let both = b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    assert_eq!(
        parse_answer(both, false).unwrap(),
        Some(Parsed { status: 200, length: both.len(), close: true, interim: false, purged: None })
    );
    // Another transfer coding last: the body ends with the connection.
    let gzip = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzz";
    assert_eq!(parse_answer(gzip, false).unwrap(), None);
    assert!(parse_answer(gzip, true).unwrap().unwrap().close);
    let mixed = b"HTTP/1.1 200 OK\r\nConnection: close\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n";
    assert!(parse_answer(mixed, false).unwrap().unwrap().close, "close wins");
    let old_keep = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n";
    assert!(!parse_answer(old_keep, false).unwrap().unwrap().close);
    let batch = b"HTTP/1.1 503 Busy\r\nX-Cachectl-Purged: 5\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(parse_answer(batch, false).unwrap().unwrap().purged, Some(5));
}

/// A node on a free port that runs `serve` on every connection it accepts; returns its
/// address and how many connections it accepted.
async fn node<F, Fut>(serve: F) -> (String, Arc<AtomicUsize>)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(stream));
        }
    });
    (address, accepted)
}

/// A node that answers `per_connection` requests per connection, then closes it the way
/// nginx does at its keep-alive limit, answering requests pipelined after the limit never.
async fn closing_node(per_connection: usize) -> (String, Arc<AtomicUsize>) {
    node(move |stream| async move {
        let (read, mut write) = stream.into_split();
        let mut lines = tokio::io::BufReader::new(read).lines();
        let mut answered = 0;
        while let Ok(Some(line)) = lines.next_line().await {
            if !line.is_empty() {
                continue;
            }
            answered += 1;
            let last = answered == per_connection;
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n{}\r\nok",
                if last { "Connection: close\r\n" } else { "" }
            );
            if write.write_all(answer.as_bytes()).await.is_err() || last {
                return;
            }
        }
    })
    .await
}

fn settings(connections: usize, depth: usize) -> LaneSettings {
    LaneSettings {
        connections,
        depth,
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        batch: 1,
    }
}

#[tokio::test]
async fn resends_what_a_closed_connection_left_unanswered() {
    let (address, connections) = closing_node(3).await;
    let lane = Lane::spawn(&address, settings(1, 8));
    let request = request_bytes("PURGE", "/x", "h", &[]).unwrap();
    let answers = futures::future::join_all((0..20).map(|_| lane.send_bytes(request.clone()))).await;
    assert!(answers.iter().all(|a| a == &Ok(200)), "{answers:?}");
    assert!(connections.load(Ordering::SeqCst) >= 7, "a new connection after every third answer");
}

#[tokio::test]
async fn reports_unreachable_and_silent_nodes() {
    // A port with no listener.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    drop(listener);
    let lane = Lane::spawn(&address, settings(2, 4));
    let error = lane.send_bytes(request_bytes("PURGE", "/x", "h", &[]).unwrap()).await.unwrap_err();
    assert!(error.starts_with("connect error:"), "{error}");

    // A node that accepts and never answers.
    let (address, _) = node(|stream| async move {
        std::future::pending::<()>().await;
        drop(stream);
    })
    .await;
    let mut quick = settings(1, 4);
    quick.request_timeout = Duration::from_millis(200);
    let lane = Lane::spawn(&address, quick);
    let error = lane.send_bytes(request_bytes("PURGE", "/x", "h", &[]).unwrap()).await.unwrap_err();
    assert!(error.starts_with("timeout:"), "{error}");
}

#[tokio::test]
async fn a_node_that_closes_at_once_fails_after_the_resends() {
    let (address, accepted) = node(|stream| async move { drop(stream) }).await;
    let lane = Lane::spawn(&address, settings(1, 4));
    let error = lane.send_bytes(request_bytes("PURGE", "/x", "h", &[]).unwrap()).await.unwrap_err();
    assert!(error.starts_with("request error:"), "{error}");
    // The listener task counts the last connection after the lane has given up on it.
    for _ in 0..100 {
        if accepted.load(Ordering::SeqCst) > usize::from(MAX_RESENDS) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), usize::from(MAX_RESENDS) + 1, "one write and two resends");
}

#[tokio::test]
async fn a_status_cut_off_in_its_body_is_the_answer() {
    // Answers the first request with a status and half its body, then closes.
    let (address, accepted) = node(|stream| async move {
        let (read, mut write) = stream.into_split();
        let mut lines = tokio::io::BufReader::new(read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.is_empty() {
                let _ = write.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n\r\nmiss").await;
                return;
            }
        }
    })
    .await;
    let lane = Lane::spawn(&address, settings(1, 4));
    let answer = lane.send_bytes(request_bytes("PURGE", "/x", "h", &[]).unwrap()).await;
    assert_eq!(answer, Ok(404), "the node handled the request and said so");
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "not sent again");
}

/// A node that answers every request, and 100 ms after each answer, if nothing more came,
/// sends an unasked 408 and closes (as a proxy's idle timeout does).
async fn node_timing_out_idle_connections() -> String {
    let (address, _) = node(|stream| async move {
        let (read, mut write) = stream.into_split();
        let mut lines = tokio::io::BufReader::new(read).lines();
        loop {
            match tokio::time::timeout(Duration::from_millis(100), lines.next_line()).await {
                Ok(Ok(Some(line))) if line.is_empty() => {
                    let _ = write.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
                }
                Ok(Ok(Some(_))) => {}
                Ok(_) => return,
                Err(_) => {
                    let _ = write
                        .write_all(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
                        .await;
                    return;
                }
            }
        }
    })
    .await;
    address
}

#[tokio::test]
async fn an_idle_connection_the_node_gave_up_is_not_reused() {
    let address = node_timing_out_idle_connections().await;
    let lane = Lane::spawn(&address, settings(1, 4));
    let request = request_bytes("PURGE", "/x", "h", &[]).unwrap();
    assert_eq!(lane.send_bytes(request.clone()).await, Ok(200));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(lane.send_bytes(request).await, Ok(200), "not the 408 sent to nobody");
}

#[tokio::test]
async fn interim_answers_do_not_extend_the_timeout() {
    let (address, _) = node(|mut stream| async move {
        while stream.write_all(b"HTTP/1.1 102 Processing\r\n\r\n").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let mut quick = settings(1, 4);
    quick.request_timeout = Duration::from_millis(300);
    let lane = Lane::spawn(&address, quick);
    let send = lane.send_bytes(request_bytes("PURGE", "/x", "h", &[]).unwrap());
    let error = tokio::time::timeout(Duration::from_secs(5), send)
        .await
        .expect("the request times out instead of waiting on interim answers")
        .unwrap_err();
    assert!(error.starts_with("timeout:"), "{error}");
}

/// Requests that arrive while an answer is awaited are not written one by one as they come: they
/// leave together once the answer is read. The node holds its first answer until five more
/// requests were sent, checks that none of them reached it meanwhile, then answers; the five
/// arrive in one piece.
#[tokio::test]
async fn requests_arriving_while_an_answer_is_awaited_leave_together_after_it() {
    let (first_read, first_seen) = oneshot::channel::<()>();
    let (release, released) = oneshot::channel::<()>();
    let (report, reported) = oneshot::channel::<(usize, usize)>();
    let parts = Arc::new(std::sync::Mutex::new(Some((first_read, released, report))));
    let (address, _) = node(move |mut stream| {
        let parts = parts.lock().unwrap().take();
        async move {
            let Some((first_read, released, report)) = parts else { return };
            let request_count = |bytes: &[u8]| bytes.windows(4).filter(|w| w == b"\r\n\r\n").count();
            let mut buf = vec![0_u8; 64 * 1024];
            let n = stream.read(&mut buf).await.unwrap();
            assert_eq!(request_count(&buf[..n]), 1, "the first request alone");
            first_read.send(()).unwrap();
            released.await.unwrap();
            // Whatever the lane wrote while the first answer was held is readable now.
            let early = match stream.try_read(&mut buf) {
                Ok(n) => request_count(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                Err(e) => panic!("{e}"),
            };
            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
            stream.write_all(answer).await.unwrap();
            let mut later = 0;
            let mut pieces = 0;
            while early + later < 5 {
                let n = stream.read(&mut buf).await.unwrap();
                later += request_count(&buf[..n]);
                pieces += 1;
            }
            stream.write_all(&answer.repeat(5)).await.unwrap();
            report.send((early, pieces)).unwrap();
            let _ = stream.read(&mut buf).await;
        }
    })
    .await;
    let lane = Lane::spawn(&address, settings(1, 16));
    let request = request_bytes("PURGE", "/x", "h", &[]).unwrap();
    let first = tokio::spawn({
        let (lane, request) = (lane.clone(), request.clone());
        async move { lane.send_bytes(request).await }
    });
    first_seen.await.unwrap();
    let mut rest = Vec::new();
    for _ in 0..5 {
        let (lane, request) = (lane.clone(), request.clone());
        rest.push(tokio::spawn(async move { lane.send_bytes(request).await }));
        // Each arrives on its own, as an item's request does.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    release.send(()).unwrap();
    assert_eq!(first.await.unwrap(), Ok(200));
    for answer in rest {
        assert_eq!(answer.await.unwrap(), Ok(200));
    }
    let (early, pieces) = reported.await.unwrap();
    assert_eq!(early, 0, "no request was written while the first answer was awaited");
    assert_eq!(pieces, 1, "the five left in one write");
}

/// What a batching node saw of one request: its path and its `X-Cachectl-Next`.
type Seen = Arc<std::sync::Mutex<Vec<(String, Option<String>)>>>;

/// A node that reads pipelined PURGEs, records each, and answers each with
/// `confirm(paths in the request)`: a status and the `X-Cachectl-Purged` to send, if any. Its
/// first answer waits 200 ms, so that the requests sent meanwhile wait together in the lane.
async fn batch_node(confirm: fn(usize) -> (u16, Option<usize>)) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let (address, _) = node(move |mut stream| {
        let seen = record.clone();
        async move {
            let mut buf = BytesMut::new();
            let mut first = true;
            loop {
                let mut headers = [httparse::EMPTY_HEADER; 16];
                let mut request = httparse::Request::new(&mut headers);
                let Ok(httparse::Status::Complete(n)) = request.parse(&buf) else {
                    if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                    continue;
                };
                let path = request.path.unwrap_or_default().to_owned();
                let next = request
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("x-cachectl-next"))
                    .map(|h| String::from_utf8_lossy(h.value).into_owned());
                let paths = 1 + next.as_deref().map_or(0, |n| n.split(' ').count());
                seen.lock().unwrap().push((path, next));
                buf.advance(n);
                if std::mem::take(&mut first) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                let (status, purged) = confirm(paths);
                let header = purged.map(|p| format!("x-cachectl-purged: {p}\r\n")).unwrap_or_default();
                let answer = format!("HTTP/1.1 {status} X\r\n{header}content-length: 0\r\n\r\n");
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (address, seen)
}

/// Sends a plain PURGE of each of `paths` (host `h`) on `lane`, the first alone and the others
/// 20 ms later at once, and their answers.
async fn purge_all(lane: &Lane, paths: &[&str]) -> Vec<Result<u16, TransportError>> {
    let sends = paths.iter().enumerate().map(|(i, path)| {
        let lane = lane.clone();
        let request = crate::transport::Request::new(
            crate::plan(
                crate::Driver::Varnish,
                cachectl_core::Kind::Refresh,
                cachectl_core::ItemType::Url,
                &format!("http://h{path}"),
            )
            .unwrap(),
        )
        .unwrap();
        tokio::spawn(async move {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            lane.send(request).await
        })
    });
    let mut answers = Vec::new();
    for send in sends.collect::<Vec<_>>() {
        answers.push(send.await.unwrap());
    }
    answers
}

fn batched(depth: usize, batch: usize) -> LaneSettings {
    LaneSettings { batch, ..settings(1, depth) }
}

/// Every path of `paths` was requested: as a request's path or in its `X-Cachectl-Next`.
fn requested(seen: &Seen) -> Vec<String> {
    let mut all: Vec<String> = Vec::new();
    for (path, next) in seen.lock().unwrap().iter() {
        all.push(path.clone());
        all.extend(next.iter().flat_map(|n| n.split(' ').map(str::to_owned)));
    }
    all.sort();
    all
}

#[tokio::test]
async fn plain_purges_waiting_together_leave_in_one_request_the_node_confirms() {
    let (address, seen) = batch_node(|paths| (200, Some(paths))).await;
    let lane = Lane::spawn(&address, batched(1, 8));
    let paths = ["/0", "/1", "/2", "/3", "/4", "/5"];
    assert!(purge_all(&lane, &paths).await.iter().all(|a| *a == Ok(200)));
    let seen_now = seen.lock().unwrap().clone();
    assert_eq!(seen_now.len(), 2, "the first alone, the five that waited in one request: {seen_now:?}");
    assert_eq!(seen_now[1].1.as_deref().map(|n| n.split(' ').count()), Some(4));
    assert_eq!(requested(&seen), paths);
}

#[tokio::test]
async fn a_batch_confirmed_in_part_is_finished_in_batches_of_what_the_node_took() {
    // As varnishd with max_restarts = 1: two paths, then a 503 that says so.
    let (address, seen) = batch_node(|paths| if paths <= 2 { (200, Some(paths)) } else { (503, Some(2)) }).await;
    let lane = Lane::spawn(&address, batched(1, 8));
    let paths = ["/0", "/1", "/2", "/3", "/4", "/5", "/6"];
    assert!(purge_all(&lane, &paths).await.iter().all(|a| *a == Ok(200)));
    let seen_now = seen.lock().unwrap().clone();
    let sizes: Vec<usize> =
        seen_now.iter().map(|(_, n)| 1 + n.as_deref().map_or(0, |n| n.split(' ').count())).collect();
    // The first alone; six in one request, of which two were purged; then the four left in twos.
    assert_eq!(sizes, [1, 6, 2, 2], "{seen_now:?}");
    let mut all = requested(&seen);
    all.dedup();
    assert_eq!(all, paths);
}

#[tokio::test]
async fn a_node_that_does_not_confirm_a_batch_gets_one_path_a_request() {
    // A VCL without cachectl's vcl_purge: the request's own path is purged, the header ignored.
    let (address, seen) = batch_node(|_| (200, None)).await;
    let lane = Lane::spawn(&address, batched(1, 8));
    let paths = ["/0", "/1", "/2", "/3", "/4"];
    assert!(purge_all(&lane, &paths).await.iter().all(|a| *a == Ok(200)));
    let seen_now = seen.lock().unwrap().clone();
    let own: Vec<&str> = seen_now.iter().map(|(p, _)| p.as_str()).collect();
    // The first alone, a batch of four whose first path alone counts, then the three left alone.
    assert_eq!(seen_now.iter().filter(|(_, n)| n.is_some()).count(), 1, "{seen_now:?}");
    assert_eq!(own.len(), 5);
    let mut own_sorted = own.clone();
    own_sorted.sort_unstable();
    assert_eq!(own_sorted, paths, "every path was a request's own path once");
    // Later purges are not batched.
    let more = ["/a", "/b", "/c"];
    assert!(purge_all(&lane, &more).await.iter().all(|a| *a == Ok(200)));
    assert!(seen.lock().unwrap()[5..].iter().all(|(_, n)| n.is_none()));
}

#[tokio::test]
async fn only_plain_purges_of_one_host_share_a_request() {
    let (address, seen) = batch_node(|paths| (200, Some(paths))).await;
    let lane = Lane::spawn(&address, batched(1, 8));
    let request = |url: &str, soft: bool| {
        let plan = crate::plan_item(
            crate::Driver::Varnish,
            cachectl_core::Kind::Refresh,
            cachectl_core::ItemType::Url,
            url,
            soft,
        );
        Request::new(plan.unwrap()).unwrap()
    };
    // The first waits for its answer; the others queue behind it in this order.
    let mut sends = Vec::new();
    for (url, soft) in [
        ("http://h/first", false),
        ("http://h/soft", true),
        ("http://other/x", false),
        ("http://h/y", false),
        ("http://h/z", false),
    ] {
        let (lane, request) = (lane.clone(), request(url, soft));
        sends.push(tokio::spawn(async move { lane.send(request).await }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for send in sends {
        assert_eq!(send.await.unwrap(), Ok(200));
    }
    let seen_now = seen.lock().unwrap().clone();
    let own: Vec<&str> = seen_now.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(own, ["/first", "/soft", "/x", "/y"], "{seen_now:?}");
    assert_eq!(seen_now[3].1.as_deref(), Some("/z"), "only the two plain purges of h shared a request");
}
