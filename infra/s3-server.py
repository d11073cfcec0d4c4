"""The local stack's S3 server: moto's S3 (in memory) behind the check MinIO or AWS makes, that
every request is signed (AWS Signature V4, in the Authorization header or a presigned URL) with
the stack's key. Anonymous, wrongly signed, expired or other-key requests get S3's own 403
answer; nothing reaches moto unsigned (not its /moto-api either).

  python infra/s3-server.py [--host 127.0.0.1] [--port 9000] [--buckets mlflow models data]

The key is AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (infra/local-stack.sh sets them from
server.env's S3_ACCESS_KEY / S3_SECRET_KEY). Its request log names the method, the path and
the status, never a query string: a presigned URL's carries the access key id. Prints one line
`S3 ready at URL (buckets ...)` once it accepts connections.
"""

from __future__ import annotations

import argparse
import hmac
import os
import sys
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, quote

ALGORITHM = "AWS4-HMAC-SHA256"
CLOCK_SKEW = timedelta(minutes=15)  # what S3 allows between a request's X-Amz-Date and now


def refusal(environ: dict[str, Any], key_id: str, secret: str) -> tuple[str, str] | None:
    """(S3 error code, message) when the request is not signed with this key, else None."""
    from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    headers = {
        name[5:].replace("_", "-").lower(): value
        for name, value in environ.items() if name.startswith("HTTP_")
    }  # fmt: skip
    for name in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(name):
            headers[name.replace("_", "-").lower()] = environ[name]
    query = environ.get("QUERY_STRING", "")
    params = parse_qs(query, keep_blank_values=True)
    authorization = headers.get("authorization", "")
    if authorization.startswith(ALGORITHM + " "):
        fields = dict(
            part.strip().split("=", 1) for part in authorization[len(ALGORITHM) + 1 :].split(",")
            if "=" in part
        )  # fmt: skip
        credential = fields.get("Credential", "")
        signed, signature = fields.get("SignedHeaders", ""), fields.get("Signature", "")
        stamp, expires = headers.get("x-amz-date", ""), None
    elif params.get("X-Amz-Algorithm") == [ALGORITHM] and "X-Amz-Signature" in params:
        credential = params.get("X-Amz-Credential", [""])[0]
        signed, signature = params.get("X-Amz-SignedHeaders", [""])[0], params["X-Amz-Signature"][0]
        stamp, expires = params.get("X-Amz-Date", [""])[0], params.get("X-Amz-Expires", ["0"])[0]
        # the signature signs every other query parameter, as sent
        query = "&".join(p for p in query.split("&") if not p.startswith("X-Amz-Signature="))
    elif authorization or "Signature" in params or "AWSAccessKeyId" in params:
        return "AccessDenied", "Only AWS Signature Version 4 is accepted."
    else:
        return "AccessDenied", "Anonymous requests are refused: sign with the stack's S3 key."
    scope = credential.split("/")
    if len(scope) != 5 or scope[0] != key_id:
        return "InvalidAccessKeyId", "The AWS access key Id you provided does not exist."
    if scope[3] != "s3":
        return "AccessDenied", "This server speaks S3 only."
    try:
        when = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return "AccessDenied", "X-Amz-Date is missing or malformed."
    now = datetime.now(UTC)
    if expires is None and abs(now - when) > CLOCK_SKEW:
        return "RequestTimeTooSkewed", "The difference between the request time and now is too large."
    if expires is not None and not (when - CLOCK_SKEW <= now <= when + timedelta(seconds=int(expires))):
        return "AccessDenied", "Request has expired."
    names = signed.split(";")
    if "host" not in names or any(n not in headers for n in names):
        return "AccessDenied", "A signed header is missing."
    raw_path = environ.get("RAW_URI", "").split("?", 1)[0] or quote(environ.get("PATH_INFO", ""))
    request = AWSRequest(
        method=environ["REQUEST_METHOD"],
        url=f"http://{headers['host']}{raw_path}" + (f"?{query}" if query else ""),
        headers={n: headers[n] for n in names},
    )
    request.context["timestamp"] = stamp
    keys = Credentials(key_id, secret)
    auth = S3SigV4QueryAuth(keys, "s3", scope[2]) if expires is not None else S3SigV4Auth(
        keys, "s3", scope[2]
    )
    expected = auth.signature(auth.string_to_sign(request, auth.canonical_request(request)),
                              request)  # fmt: skip
    if not hmac.compare_digest(expected, signature):
        return "SignatureDoesNotMatch", "The request signature we calculated does not match."
    return None


def signed_only(app: Any, key_id: str, secret: str) -> Any:
    """A WSGI app that passes to `app` only requests signed with this key."""

    def checked(environ: dict[str, Any], start_response: Any) -> Any:
        refused = refusal(environ, key_id, secret)
        if refused is None:
            return app(environ, start_response)
        code, message = refused
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
        ).encode()
        start_response("403 Forbidden", [("Content-Type", "application/xml"),
                                         ("Content-Length", str(len(body)))])  # fmt: skip
        return [body]

    return checked


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--buckets", nargs="*", default=["mlflow", "models"])
    args = parser.parse_args()
    key_id, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key_id or not secret:
        print("infra/s3-server.py: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (the S3 keys: "
              "infra/new-credentials.sh)", file=sys.stderr)  # fmt: skip
        return 2
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
    from moto.s3.models import s3_backends
    from werkzeug.serving import make_server

    class QuietHandler(MotoRequestHandler):
        def log_request(self, code: Any = "-", size: Any = "-") -> None:
            # method, path, status: never the query string (a presigned URL names the key id)
            self.log("info", '"%s %s" %s', self.command, self.path.split("?", 1)[0], code)

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for bucket in args.buckets:
        backend.create_bucket(bucket, os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    app = signed_only(create_backend_app("s3"), key_id, secret)
    server = make_server(args.host, args.port, app, threaded=True, request_handler=QuietHandler)
    url = f"http://{args.host}:{server.server_port}"
    print(f"S3 ready at {url} (buckets {', '.join(args.buckets) or 'none'}; signed requests "
          "only)", flush=True)  # fmt: skip
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
