"""`python imgapi.py keys create|list|revoke`: API keys on the service's own settings (the same
database), usable while the service runs; processes see a change within about a second."""

from __future__ import annotations

import argparse
import asyncio
import sys

from imgapi_core import settings as settings_mod
from imgapi_core.access import scopes, tokens
from imgapi_core.store import ApiKey, KeyExists, open_store
from imgapi_core.timestamps import now_iso


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="imgapi.py keys", description="manage API keys")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="make a key; its token is printed once, last")
    create.add_argument("name")
    create.add_argument(
        "--scopes",
        default=",".join(scopes.DEFAULT_SCOPES),
        help=f"comma-separated, of {', '.join(scopes.SCOPES)} (default: %(default)s)",
    )
    sub.add_parser("list", help="name, scopes, created, last used (never a token)")
    revoke = sub.add_parser("revoke", help="the key stops working within about a second")
    revoke.add_argument("name")
    args = parser.parse_args(argv)
    if args.command == "create":
        try:
            granted = scopes.parse_scopes(args.scopes)
        except ValueError as exc:
            parser.error(str(exc))
        if not args.name.strip() or len(args.name) > 100 or not args.name.isprintable():
            parser.error("NAME must be 1-100 printable characters")
    cfg = settings_mod.load_or_exit()
    return asyncio.run(_run(cfg, args, granted if args.command == "create" else ()))


async def _run(
    cfg: settings_mod.Settings, args: argparse.Namespace, granted: tuple[str, ...]
) -> int:
    store = await open_store(cfg)
    try:
        if args.command == "create":
            key_id, token = tokens.new_key_token()
            key = ApiKey(args.name, key_id, tokens.hash_token(token), granted, now_iso())
            try:
                await store.create_key(key)
            except KeyExists:
                print(
                    f"imgapi: a key named {args.name!r} exists (revoke it first)", file=sys.stderr
                )
                return 1
            print(f"created key {args.name!r} with scopes {','.join(granted)}.")
            print("Its token is shown only now; send it as 'Authorization: Bearer TOKEN':")
            print(token)
            return 0
        if args.command == "list":
            keys = await store.list_keys()
            print(f"{'name':<24} {'scopes':<28} {'created':<25} {'last used':<25} revoked")
            for key in keys:
                print(
                    f"{key.name:<24} {','.join(key.scopes):<28} {key.created_at:<25}"
                    f" {key.last_used_at or '-':<25} {key.revoked_at or '-'}"
                )
            return 0
        if await store.revoke_key(args.name, now_iso()):
            print(f"revoked key {args.name!r}")
            return 0
        print(f"imgapi: no active key named {args.name!r}", file=sys.stderr)
        return 1
    finally:
        await store.close()
