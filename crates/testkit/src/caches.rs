//! Real caches for tests, built from the project's shipped edge configuration
//! (`deploy/varnish/cachectl.vcl`, `deploy/nginx/cachectl.conf`), and the origin behind them: all
//! on 127.0.0.1 with free ports, all stopped when dropped. Shared by the end-to-end tests
//! (`crates/cli/tests/e2e`) and the edge crate's transport tests (`crates/edge/tests`).

use crate::{Group, free_port};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The repository's root, where `deploy/` lives.
///
/// # Panics
/// The crate is not inside the repository.
#[must_use]
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// A temporary directory the caches' unprivileged workers can enter (Varnish and nginx drop root).
///
/// # Panics
/// The directory cannot be made.
#[must_use]
pub fn shared_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Waits until `port` accepts connections.
///
/// # Panics
/// Nothing listens within 20 seconds.
pub async fn wait_port(port: u16, what: &str) {
    let start = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "{what} did not start listening on {port}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until a process of `group` listens on `port` (not merely something: [`crate::group_listens`]).
///
/// # Panics
/// As [`try_listening`].
pub async fn wait_listening(group: &mut Group, port: u16, what: &str) {
    if let Err(e) = try_listening(group, port, what, Duration::from_secs(20)).await {
        panic!("{e}");
    }
}

/// Waits until a process of `group` listens on `port`.
///
/// # Errors
/// The group's leader exited first (the port was taken, or the program failed), or it does not
/// listen `within`.
pub async fn try_listening(group: &mut Group, port: u16, what: &str, within: Duration) -> Result<(), String> {
    let start = Instant::now();
    while !crate::group_listens(group.id(), port) {
        if let Some(exited) = group.try_wait().ok().flatten() {
            return Err(format!("{what} exited ({exited}) before listening on {port}: was the port taken?"));
        }
        if start.elapsed() > within {
            return Err(format!("{what} did not start listening on {port} within {within:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A request the origin answered.
#[derive(Debug, Clone)]
pub struct OriginHit {
    /// Its `Host` header.
    pub host: String,
    /// Its path and query.
    pub path: String,
}

/// How long the origin takes to answer a refetch under `/gen/`.
pub const REFETCH_DELAY: Duration = Duration::from_millis(700);

/// An HTTP origin: answers every GET with a cacheable body naming the host and path;
/// `/status/NNN...` answers NNN; `/big...` answers 1 MiB. A query's `skey=a+b` tags the answer
/// with `Surrogate-Key: a b`, its `ctag=a,b` with `Cache-Tag: a,b`; under `/gen/` the body ends
/// with ` #N`, N counting the origin's answers to that host and path (which fetch it came from),
/// and every fetch after the first is answered after `REFETCH_DELAY`, so that a cache serving the
/// stale object meanwhile is seen doing so however busy the machine is.
pub struct Origin {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Every request it answered, in order.
    pub hits: Arc<Mutex<Vec<OriginHit>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Origin {
    /// Starts the origin on a free port, in the test's runtime.
    ///
    /// # Panics
    /// No port can be bound.
    pub async fn start() -> Self {
        let hits: Arc<Mutex<Vec<OriginHit>>> = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new().fallback(origin_handler).with_state(hits.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { port, hits, task }
    }

    /// How many requests for `host` + `path` reached the origin.
    #[must_use]
    pub fn count(&self, host: &str, path: &str) -> usize {
        self.hits.lock().unwrap().iter().filter(|h| h.host == host && h.path == path).count()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn origin_handler(State(hits): State<Arc<Mutex<Vec<OriginHit>>>>, headers: HeaderMap, uri: Uri) -> Response {
    let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("").to_owned();
    let path = uri.path_and_query().map_or_else(|| uri.path().to_owned(), |p| p.as_str().to_owned());
    let fetch = {
        let mut hits = hits.lock().unwrap();
        hits.push(OriginHit { host: host.clone(), path: path.clone() });
        hits.iter().filter(|h| h.host == host && h.path == path).count()
    };
    if let Some(code) = path.strip_prefix("/status/").and_then(|rest| rest.get(..3)).and_then(|c| c.parse::<u16>().ok())
    {
        return (StatusCode::from_u16(code).unwrap(), "status page").into_response();
    }
    if path.starts_with("/gen/") && fetch > 1 {
        tokio::time::sleep(REFETCH_DELAY).await;
    }
    let body = if path.starts_with("/big") {
        "x".repeat(1 << 20)
    } else if path.starts_with("/gen/") {
        format!("content of {host}{path} #{fetch}\n")
    } else {
        format!("content of {host}{path}\n")
    };
    let mut response = ([("cache-control", "public, max-age=3600")], body).into_response();
    for pair in uri.query().unwrap_or("").split('&') {
        let tagged = match pair.split_once('=') {
            Some(("skey", v)) => Some(("surrogate-key", v.replace('+', " "))),
            Some(("ctag", v)) => Some(("cache-tag", v.replace("%2C", ","))),
            _ => None,
        };
        if let Some((name, value)) = tagged.and_then(|(n, v)| Some((n, axum::http::HeaderValue::from_str(&v).ok()?))) {
            response.headers_mut().append(name, value);
        }
    }
    response
}

/// A Varnish 7.1 cache running the project's `deploy/varnish/cachectl.vcl`, with the
/// parameters docs/edges.md asks for (`max_restarts = 8`, for batched purges).
pub struct Varnish {
    /// Its HTTP port on 127.0.0.1.
    pub port: u16,
    varnishd: crate::Varnishd,
}

impl Varnish {
    /// Varnish on a free port (up to three tries, [`crate::Varnishd::start`]).
    ///
    /// # Panics
    /// varnishd does not start.
    pub async fn start(origin_port: u16) -> Self {
        let varnishd = crate::Varnishd::start(&Self::vcl(origin_port), Self::ARGS).await;
        Self::wrap(varnishd.unwrap_or_else(|e| panic!("{e}")))
    }

    /// Varnish on `port` (a node that comes back on its old address).
    ///
    /// # Panics
    /// varnishd does not start.
    pub async fn start_on(port: u16, origin_port: u16) -> Self {
        let varnishd = crate::Varnishd::start_on(port, &Self::vcl(origin_port), Self::ARGS).await;
        Self::wrap(varnishd.unwrap_or_else(|e| panic!("{e}")))
    }

    /// Varnish running `vcl` (the shipped VCL with the origin's port, [`Varnish::shipped_vcl`],
    /// or a variant of it) with `params` (`name=value`) after the usual arguments.
    ///
    /// # Panics
    /// varnishd does not start.
    pub async fn start_custom(vcl: &str, params: &[&str]) -> Self {
        let mut args: Vec<&str> = Self::ARGS.to_vec();
        for param in params {
            args.extend(["-p", param]);
        }
        let varnishd = crate::Varnishd::start(vcl, &args).await;
        Self::wrap(varnishd.unwrap_or_else(|e| panic!("{e}")))
    }

    /// The shipped VCL with `origin_port` as its backend's port.
    #[must_use]
    pub fn shipped_vcl(origin_port: u16) -> String {
        Self::vcl(origin_port)
    }

    /// `varnishstat -1` counter `name` (such as `MAIN.client_req`).
    ///
    /// # Panics
    /// varnishstat fails or has no such counter.
    #[must_use]
    pub fn counter(&self, name: &str) -> u64 {
        let out = std::process::Command::new("varnishstat")
            .arg("-n")
            .arg(self.varnishd.workdir())
            .args(["-1", "-f", name])
            .output()
            .expect("varnishstat runs");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| {
                let mut parts = l.split_whitespace();
                (parts.next() == Some(name)).then(|| parts.next()?.parse().ok()).flatten()
            })
            .unwrap_or_else(|| panic!("no counter {name} in {text}"))
    }

    const ARGS: &[&str] = &["-s", "malloc,64m", "-p", "ban_lurker_sleep=0.01", "-p", "max_restarts=8"];

    /// The shipped VCL with the origin as its backend.
    fn vcl(origin_port: u16) -> String {
        let vcl = std::fs::read_to_string(repo_root().join("deploy/varnish/cachectl.vcl")).unwrap();
        let vcl = vcl.replace(".port = \"8080\";", &format!(".port = \"{origin_port}\";"));
        assert!(vcl.contains(&origin_port.to_string()), "the shipped VCL's backend port changed");
        vcl
    }

    fn wrap(varnishd: crate::Varnishd) -> Self {
        Self { port: varnishd.port, varnishd }
    }

    /// `127.0.0.1:PORT`, a node's address.
    #[must_use]
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// nginx 1.22 with the cache-purge module, running the project's `deploy/nginx/cachectl.conf`
/// once per requested server (each its own listen port and cache zone), all logging to one
/// access log so that the order of requests across servers can be read.
pub struct Nginx {
    /// One listen port per server.
    pub ports: Vec<u16>,
    dir: tempfile::TempDir,
    _group: Group,
}

impl Nginx {
    /// nginx with `servers` servers, each on a free port.
    pub async fn start(origin_port: u16, servers: usize) -> Self {
        let ports: Vec<u16> = (0..servers).map(|_| free_port()).collect();
        Self::start_on_ports(origin_port, &ports).await
    }

    /// nginx with one server per given port.
    pub async fn start_on_ports(origin_port: u16, ports: &[u16]) -> Self {
        Self::start_with(origin_port, ports, "").await
    }

    /// nginx with one server per given port and `directives` added to its `http` block.
    ///
    /// # Panics
    /// nginx (with the cache-purge module) is not installed or does not listen.
    pub async fn start_with(origin_port: u16, ports: &[u16], directives: &str) -> Self {
        let dir = shared_tempdir();
        let shipped = std::fs::read_to_string(repo_root().join("deploy/nginx/cachectl.conf")).unwrap();
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        let mut sites = String::new();
        for (i, port) in ports.iter().copied().enumerate() {
            let site = shipped
                .replace("/var/cache/nginx/cachectl", &format!("cache{i}"))
                .replace("127.0.0.1:8080", &format!("127.0.0.1:{origin_port}"))
                .replace("127.0.0.1:8081", &format!("127.0.0.1:{port}"))
                .replace("cachectl", &format!("cachectl{i}"));
            let file = format!("site{i}.conf");
            std::fs::write(dir.path().join(&file), site).unwrap();
            sites.push_str(&format!("    include {file};\n"));
        }
        let ports = ports.to_vec();
        let conf = format!(
            "load_module /usr/lib/nginx/modules/ngx_http_cache_purge_module.so;\n\
             pid logs/nginx.pid;\nworker_processes 1;\nevents {{ worker_connections 1024; }}\n\
             http {{\n    log_format timed '$msec $server_port $request_method $host $request_uri $status';\n\
             access_log logs/access.log timed;\n    {directives}\n{sites}}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let prefix = format!("{}/", dir.path().display());
        let mut group = Group::spawn(
            Command::new("nginx")
                .args([
                    "-p",
                    &prefix,
                    "-c",
                    "nginx.conf",
                    "-e",
                    &format!("{prefix}logs/error.log"),
                    "-g",
                    "daemon off;",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("nginx must be installed (scripts/test.sh installs it)");
        for port in &ports {
            wait_listening(&mut group, *port, "nginx").await;
        }
        Self { ports, dir, _group: group }
    }

    /// Server `i`'s `proxy_cache_path` directory.
    #[must_use]
    pub fn cache_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("cache{i}"))
    }

    /// `127.0.0.1:PORT` of server `i`, a node's address.
    #[must_use]
    pub fn address(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.ports[i])
    }

    /// Access log lines: (msec, server port, method, host, uri, status), in the order written.
    #[must_use]
    pub fn access_log(&self) -> Vec<(String, u16, String, String, String, u16)> {
        let text = std::fs::read_to_string(self.dir.path().join("logs/access.log")).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split(' ').collect();
                (f.len() == 6).then(|| {
                    (
                        f[0].to_owned(),
                        f[1].parse().unwrap_or(0),
                        f[2].to_owned(),
                        f[3].to_owned(),
                        f[4].to_owned(),
                        f[5].parse().unwrap_or(0),
                    )
                })
            })
            .collect()
    }
}

/// Sends a GET for `path` with `Host: host` to a cache and returns its `X-Cache` verdict
/// (`HIT`/`MISS` from the VCL, the upstream cache status from nginx).
///
/// # Panics
/// The cache does not answer with a success.
pub async fn cache_status(address: &str, host: &str, path: &str) -> String {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let response = client.get(format!("http://{address}{path}")).header("host", host).send().await.unwrap();
    assert!(response.status().is_success(), "GET {host}{path} via {address}: {}", response.status());
    let verdict = response.headers().get("x-cache").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let _ = response.bytes().await;
    verdict
}

/// Sends a GET for `path` with `Host: host` to a cache and returns its `X-Cache` verdict and
/// the body.
///
/// # Panics
/// The cache does not answer with a success.
pub async fn cache_get(address: &str, host: &str, path: &str) -> (String, String) {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let response = client.get(format!("http://{address}{path}")).header("host", host).send().await.unwrap();
    assert!(response.status().is_success(), "GET {host}{path} via {address}: {}", response.status());
    let verdict = response.headers().get("x-cache").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    (verdict, response.text().await.unwrap())
}
