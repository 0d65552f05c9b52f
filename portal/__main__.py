"""Portal administration and a development server.

    python -m portal create-user ana --admin --can-promote      # password from VF_PASSWORD or a prompt
    python -m portal create-group pathology --member ana --member ben
    python -m portal create-family colon --owner ana --group pathology   # who trains and promotes colon-*
    python -m portal serve --port 8080
    python -m portal db upgrade          # the schema to this release's (current: where it is now)

In production run it under a WSGI server, e.g. ``gunicorn -w 4 'portal.app:create_app()'``; the job
runner claims each job atomically, so several processes may share one database.
"""
from __future__ import annotations

import argparse
import getpass
import os
import sys

from sqlalchemy import create_engine

from portal import migrate
from portal.app import Settings, create_app
from portal.db import Group, ModelFamily, User, db


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    user = sub.add_parser("create-user")
    user.add_argument("username")
    user.add_argument("--admin", action="store_true")
    user.add_argument("--can-promote", action="store_true")
    group = sub.add_parser("create-group")
    group.add_argument("name")
    group.add_argument("--member", action="append", default=[])
    family = sub.add_parser("create-family", help="assign a model family (<name>-backbone, <name>-head) to an owner")
    family.add_argument("name")
    family.add_argument("--owner", required=True)
    family.add_argument("--group", help="a group whose members may use the family too")
    schema = sub.add_parser("db", help="the portal database's schema (Alembic migrations)")
    schema.add_argument("action", choices=("upgrade", "current", "head"))
    serve = sub.add_parser("serve")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    if args.command == "db":
        return _schema(args.action)

    # Serving runs jobs unless PORTAL_RUN_JOBS=0 (a site whose runner is another process); the
    # one-off commands never do.
    app = create_app(Settings() if args.command == "serve" else Settings(run_jobs=False))
    if args.command == "serve":
        app.run(host=args.host, port=args.port, threaded=True)
        return 0
    with app.app_context():
        if args.command == "create-user":
            if db.session.scalar(db.select(User).where(User.username == args.username)):
                print(f"user {args.username} exists", file=sys.stderr)
                return 1
            record = User(username=args.username, is_admin=args.admin, can_promote=args.can_promote)
            record.set_password(os.environ.get("VF_PASSWORD") or getpass.getpass(f"password for {args.username}: "))
            db.session.add(record)
        elif args.command == "create-family":
            if db.session.scalar(db.select(ModelFamily).where(ModelFamily.name == args.name)):
                print(f"model family {args.name} exists", file=sys.stderr)
                return 1
            owner = db.session.scalar(db.select(User).where(User.username == args.owner))
            group = db.session.scalar(db.select(Group).where(Group.name == args.group)) if args.group else None
            if owner is None or (args.group and group is None):
                print(f"unknown {'owner ' + args.owner if owner is None else 'group ' + args.group}", file=sys.stderr)
                return 1
            db.session.add(ModelFamily(name=args.name, owner=owner.username, group=group))
        else:
            members = [db.session.scalar(db.select(User).where(User.username == m)) for m in args.member]
            if None in members:
                print(f"unknown member(s): {[m for m, u in zip(args.member, members) if u is None]}", file=sys.stderr)
                return 1
            created = Group(name=args.name)
            db.session.add(created)
            for member in members:
                member.groups.append(created)
        db.session.commit()
    print(f"created {args.command.removeprefix('create-')} {getattr(args, 'username', None) or args.name}")
    return 0


def _schema(action: str) -> int:
    url = Settings().database_url
    engine = create_engine(url)
    try:
        if action == "upgrade":
            before = migrate.current(engine)
            after = migrate.upgrade(engine)
            print(f"portal database: {before or 'empty'} -> {after}" if before != after else f"portal database: at {after}")
        else:
            print(migrate.current(engine) if action == "current" else migrate.head())
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
