#!/usr/bin/env python3
"""Checks a session token with PyJWT, as an independent JWT implementation.

    python3 tests/support/jwt_check.py TOKEN SECRET

Verifies TOKEN with SECRET (HS256 only; `exp` and `iat` checked; `exp`, `iat`
and `sid` required), then prints the claims as one line of JSON and, on a
second line, `kid <kid from the token header>`.

Exit 0: valid. 1: invalid (the reason is printed). 2: usage. 3: PyJWT is not
installed (prints `PyJWT missing`).
"""

import json
import sys

try:
    import jwt
except ImportError:
    print("PyJWT missing")
    sys.exit(3)


def main():
    if len(sys.argv) != 3:
        print("usage: jwt_check.py TOKEN SECRET", file=sys.stderr)
        return 2
    token, secret = sys.argv[1], sys.argv[2]
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            options={"require": ["exp", "iat", "sid"], "verify_exp": True, "verify_iat": True},
        )
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError as err:
        print(f"invalid token: {type(err).__name__}: {err}")
        return 1
    if not isinstance(kid, str):
        print("invalid token: the header has no kid")
        return 1
    print(json.dumps(claims, sort_keys=True))
    print(f"kid {kid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
