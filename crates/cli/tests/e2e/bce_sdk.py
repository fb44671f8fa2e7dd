"""Drives cachectl with Baidu's official bce-python-sdk, for the end-to-end tests.

Usage: bce_sdk.py ENDPOINT AK SK COMMAND JSON_ARGS
Prints one JSON object: {"ok": true, "body": <the response's JSON>} or, when the SDK raised,
{"ok": false, "error": <exception class>, "last_error": <class of its cause>, "status_code",
"code", "request_id", "message"}.
"""
import json
import sys
import time

from baidubce.auth import bce_v1_signer
from baidubce.auth.bce_credentials import BceCredentials
from baidubce.bce_client_configuration import BceClientConfiguration
from baidubce.exception import BceError
from baidubce.retry.retry_policy import NoRetryPolicy
from baidubce.services.cdn.cdn_client import CdnClient
from baidubce.services.eo.eo_client import EoClient


def body_of(response):
    raw = getattr(response, "raw_data", None)
    return json.loads(raw) if raw else {}


def walk(list_call, args):
    """Follows nextMarker until the last page; returns every record and the page count."""
    details, pages, marker = [], 0, None
    while True:
        body = body_of(list_call(marker=marker, **args))
        pages += 1
        details.extend(body.get("details", []))
        if not body.get("isTruncated"):
            return {"details": details, "pages": pages}
        marker = body["nextMarker"]
        if pages > 1000:
            raise RuntimeError("marker loop")


def main():
    endpoint, ak, sk, command, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
    if args.pop("_expired", False):
        # Sign as if two hours ago: past the SDK's 1800 s expiration.
        original = bce_v1_signer.sign
        bce_v1_signer.sign = lambda *a, **kw: original(*a, timestamp=int(time.time()) - 7200, **kw)
    config = BceClientConfiguration(
        credentials=BceCredentials(ak, sk), endpoint=endpoint, retry_policy=NoRetryPolicy()
    )
    eo, cdn = EoClient(config), CdnClient(config)
    calls = {
        "eo_purge": lambda: body_of(eo.purge(args["tasks"], args["site"])),
        "eo_prefetch": lambda: body_of(eo.prefetch(args["tasks"], args["site"])),
        "eo_list_purge": lambda: body_of(eo.list_purge_tasks(**args)),
        "eo_list_prefetch": lambda: body_of(eo.list_prefetch_tasks(**args)),
        "eo_walk_purge": lambda: walk(eo.list_purge_tasks, args),
        "cdn_purge": lambda: body_of(cdn.purge(args["tasks"])),
        "cdn_prefetch": lambda: body_of(cdn.prefetch(args["tasks"])),
        "cdn_list_purge": lambda: body_of(cdn.list_purge_tasks(**args)),
        "cdn_list_prefetch": lambda: body_of(cdn.list_prefetch_tasks(**args)),
        "cdn_walk_purge": lambda: walk(cdn.list_purge_tasks, args),
        "cdn_quota": lambda: body_of(cdn.list_quota()),
        "cdn_records": lambda: body_of(cdn.get_domain_records(**args)),
    }
    try:
        result = {"ok": True, "body": calls[command]()}
    except BceError as e:
        last = getattr(e, "last_error", None)
        result = {
            "ok": False,
            "error": type(e).__name__,
            "last_error": type(last).__name__ if last is not None else None,
            "status_code": getattr(e, "status_code", None),
            "code": getattr(e, "code", None),
            "request_id": getattr(e, "request_id", None),
            "message": str(last if last is not None else e),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
