vcl 4.1;
# Edge configuration for Varnish 7.1 under cachectl (https://varnish-cache.org/docs/7.1/).
#
# What cachectl sends to this node:
#   PURGE <path?query>  Host: <host>                   evict exactly that URL (answers 200)
#   BAN   /             Host: <host>
#                       X-Cachectl-Ban: <regex>          evict every object of <host> whose URL
#                                                        matches ^<regex> (a regex-escaped path prefix)
#   GET   <path?query>  Host: <host>                    prefetch: an ordinary request that fills the cache
#
# Adapt the backend and the `cachectl` ACL (the addresses of your cachectl instances) to your site.
# Everything else can stay as it is; merge the marked parts into an existing VCL if you have one.

import std;

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
        return (purge);
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

sub vcl_backend_response {
    # --- cachectl: remember what each object is, for bans --------------------------------------
    set beresp.http.X-Cachectl-Url = bereq.url;
    set beresp.http.X-Cachectl-Host = bereq.http.host;
    # --- end cachectl ------------------------------------------------------------------------
}

sub vcl_deliver {
    # --- cachectl: keep the ban fields private; say whether this was a hit --------------------
    unset resp.http.X-Cachectl-Url;
    unset resp.http.X-Cachectl-Host;
    if (obj.hits > 0) {
        set resp.http.X-Cache = "HIT";
    } else {
        set resp.http.X-Cache = "MISS";
    }
    # --- end cachectl ------------------------------------------------------------------------
}
