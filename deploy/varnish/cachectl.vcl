vcl 4.1;
# Edge configuration for Varnish 7.1 under cachectl (https://varnish-cache.org/docs/7.1/).
#
# What cachectl sends to this node:
#   PURGE <path?query>  Host: <host>                   evict exactly that URL (answers 200)
#   BAN   /             Host: <host>
#                       X-Cachectl-Ban: <regex>          evict every object of <host> whose URL
#                                                        matches ^<regex> (a regex-escaped path prefix)
#   PURGE <path?query>  Host: <host>
#                       X-Cachectl-Next: <p2> <p3> ...   batched purge: evict that URL, then <host><p2>,
#                                                        <host><p3>, ... in turn (one restart each; the
#                                                        answer's X-Cachectl-Purged says how many were
#                                                        evicted, from the first: varnishd's max_restarts
#                                                        bounds a batch to max_restarts + 1 paths)
#   PURGE <path?query>  Host: <host>
#                       X-Cachectl-Soft: 1               soft purge: mark that URL stale, keep it for grace
#   PURGE /             Host: <host>
#                       X-Cachectl-Tag: <tag>            evict every object of <host> tagged <tag> by the origin
#                       [X-Cachectl-Soft: 1]             (xkey; soft: mark them stale instead)
#   BAN   /             Host: <host>
#                       X-Cachectl-Regex: <regex>        evict every object of <host> whose path and query
#                                                        match <regex> (checked by cachectl at submit)
#   GET   <path?query>  Host: <host>                    prefetch: an ordinary request that fills the cache
#
# Cache tags: the origin tags a response with `Surrogate-Key: a b c` (blank-separated) or
# `Cache-Tag: a,b,c` (comma-separated). Each tag is stored as the xkey `<host>:<tag>`, with the
# host lowercase and without its port, so that two sites' equal tags never meet.
#
# Adapt the backend and the `cachectl` ACL (the addresses of your cachectl instances) to your site.
# Everything else can stay as it is; merge the marked parts into an existing VCL if you have one.

import std;
import purge;
import xkey;

backend origin {
    .host = "127.0.0.1";
    .port = "8080";
}

# Only the control plane may evict.
acl cachectl {
    "127.0.0.1";
    "::1";
}

sub vcl_recv {
    # --- cachectl: purge and ban -------------------------------------------------------------
    if (req.method == "PURGE") {
        if (client.ip !~ cachectl) {
            return (synth(403, "Purge not allowed from this address"));
        }
        if (req.http.X-Cachectl-Tag) {
            if (req.http.X-Cachectl-Tag ~ "[\s,]" || !req.http.host) {
                return (synth(400, "A tag PURGE needs a Host and one tag without blanks or commas"));
            }
            set req.http.X-Cachectl-Key = std.tolower(regsub(req.http.host, ":[0-9]*$", "")) + ":" + req.http.X-Cachectl-Tag;
            if (req.http.X-Cachectl-Soft) {
                set req.http.X-Cachectl-Gone = xkey.softpurge(req.http.X-Cachectl-Key);
                return (synth(200, "Soft-purged " + req.http.X-Cachectl-Gone));
            }
            set req.http.X-Cachectl-Gone = xkey.purge(req.http.X-Cachectl-Key);
            return (synth(200, "Purged " + req.http.X-Cachectl-Gone));
        }
        if (req.http.X-Cachectl-Soft) {
            # purge.soft() works on the object found by the lookup: vcl_hit / vcl_miss below.
            return (hash);
        }
        return (purge);
    }
    if (req.method == "BAN" && req.http.X-Cachectl-Regex) {
        if (client.ip !~ cachectl) {
            return (synth(403, "Ban not allowed from this address"));
        }
        if (!req.http.host) {
            return (synth(400, "A regex BAN needs a Host"));
        }
        # The regex comes checked by cachectl (no blanks, no quotes, a dialect PCRE2 reads as the
        # regex crate does) and matches the path and query; the host is the lowercase name.
        if (std.ban("obj.http.X-Cachectl-Name == " + std.tolower(regsub(req.http.host, ":[0-9]*$", "")) + " && obj.http.X-Cachectl-Url ~ " + req.http.X-Cachectl-Regex)) {
            return (synth(200, "Banned"));
        }
        return (synth(400, std.ban_error()));
    }
    if (req.method == "BAN") {
        if (client.ip !~ cachectl) {
            return (synth(403, "Ban not allowed from this address"));
        }
        if (!req.http.X-Cachectl-Ban || !req.http.host) {
            return (synth(400, "BAN needs a Host and an X-Cachectl-Ban header"));
        }
        # Ban on fields stored on the object (see vcl_backend_response) so that the ban lurker
        # evicts in the background, and always scoped to one host: an edge serves many accounts.
        # std.ban() splits its argument on blanks and takes quotes and backslashes literally (unlike
        # the CLI's `ban`), so the values go in unquoted: neither a host nor an encoded path has a blank.
        if (std.ban("obj.http.X-Cachectl-Host == " + req.http.host + " && obj.http.X-Cachectl-Url ~ ^" + req.http.X-Cachectl-Ban)) {
            return (synth(200, "Banned"));
        }
        return (synth(400, std.ban_error()));
    }
    # --- end cachectl ------------------------------------------------------------------------
}

sub vcl_purge {
    # --- cachectl: batched purge ---------------------------------------------------------------
    # The URL of this pass is gone; the next path of X-Cachectl-Next (same host) is purged by a
    # restart. The count goes back in the answer (vcl_synth), also when varnishd stops the
    # restarts at max_restarts (a 503): cachectl sends the rest again.
    set req.http.X-Cachectl-Purged = std.integer(req.http.X-Cachectl-Purged, 0) + 1;
    if (req.http.X-Cachectl-Next) {
        set req.url = regsub(req.http.X-Cachectl-Next, " .*$", "");
        if (req.http.X-Cachectl-Next ~ " ") {
            set req.http.X-Cachectl-Next = regsub(req.http.X-Cachectl-Next, "^[^ ]+ +", "");
        } else {
            unset req.http.X-Cachectl-Next;
        }
        return (restart);
    }
    return (synth(200, "Purged"));
    # --- end cachectl ------------------------------------------------------------------------
}

sub vcl_synth {
    # --- cachectl: how many paths a (batched) purge evicted -------------------------------------
    if (req.method == "PURGE" && req.http.X-Cachectl-Purged) {
        set resp.http.X-Cachectl-Purged = req.http.X-Cachectl-Purged;
    }
    # --- end cachectl ------------------------------------------------------------------------
}

sub vcl_hit {
    # --- cachectl: soft purge ------------------------------------------------------------------
    if (req.method == "PURGE") {
        set req.http.X-Cachectl-Gone = purge.soft(0s);
        return (synth(200, "Soft-purged " + req.http.X-Cachectl-Gone));
    }
    # --- end cachectl ------------------------------------------------------------------------
}

sub vcl_miss {
    # --- cachectl: soft purge (variants of a URL that missed) ---------------------------------
    if (req.method == "PURGE") {
        set req.http.X-Cachectl-Gone = purge.soft(0s);
        return (synth(200, "Soft-purged " + req.http.X-Cachectl-Gone));
    }
    # --- end cachectl ------------------------------------------------------------------------
}

sub vcl_backend_response {
    # --- cachectl: remember what each object is, for bans --------------------------------------
    set beresp.http.X-Cachectl-Url = bereq.url;
    set beresp.http.X-Cachectl-Host = bereq.http.host;
    set beresp.http.X-Cachectl-Name = std.tolower(regsub(bereq.http.host, ":[0-9]*$", ""));
    # --- cachectl: cache tags as host-scoped xkeys ---------------------------------------------
    # Only keys built here count: an origin's own xkey header would reach other sites' keys.
    unset beresp.http.xkey;
    std.collect(beresp.http.Surrogate-Key, " ");
    std.collect(beresp.http.Cache-Tag, ",");
    set beresp.http.X-Cachectl-Tags = regsuball(beresp.http.Surrogate-Key + " " + beresp.http.Cache-Tag, "[\s,]+", " ");
    if (beresp.http.X-Cachectl-Tags ~ "[^ ]") {
        set beresp.http.xkey = regsuball(" " + beresp.http.X-Cachectl-Tags, " +([^ ]+)", " " + beresp.http.X-Cachectl-Name + ":\1");
    }
    unset beresp.http.X-Cachectl-Tags;
    # --- end cachectl ------------------------------------------------------------------------
}

sub vcl_deliver {
    # --- cachectl: keep the ban fields private; say whether this was a hit --------------------
    unset resp.http.X-Cachectl-Url;
    unset resp.http.X-Cachectl-Host;
    unset resp.http.X-Cachectl-Name;
    unset resp.http.xkey;
    if (obj.hits > 0) {
        set resp.http.X-Cache = "HIT";
    } else {
        set resp.http.X-Cache = "MISS";
    }
    # --- end cachectl ------------------------------------------------------------------------
}
