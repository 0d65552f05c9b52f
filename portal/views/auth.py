"""Sign-in: local accounts (throttled per account and address) and institutional OpenID Connect."""
from __future__ import annotations

import secrets

from flask import Blueprint, abort, current_app, flash, redirect, request, session, url_for
from flask_login import current_user, login_required, login_user, logout_user

from portal.db import User, db
from portal.web import answer, audit, payload, same_origin_path, settings, text, wants_json

bp = Blueprint("auth", __name__)


def _sign_in(user: User, method: str):
    login_user(user)
    session["csrf_token"] = secrets.token_hex(16)
    audit("login", user.username, user=user.username, method=method)


@bp.route("/login", methods=["GET", "POST"])
@bp.post("/api/login", endpoint="api_login")
def login():
    if request.method == "GET":
        return answer({}, "login.html")
    data = payload()
    username, password = text(data, "username")[:64], text(data, "password")
    address = request.remote_addr or "unknown"
    throttle = settings().throttle
    wait = throttle.admit(username, address)
    if wait:
        audit("login", username, outcome="throttled", user=username or "anonymous", address=address, retry_after=wait)
        message = f"too many failed sign-ins; try again in {wait} s"
        if not wants_json():
            flash(message[0].upper() + message[1:] + ".")
        body, status = answer({"error": message}, "login.html", 429)
        return body, status, {"Retry-After": str(wait)}
    user = db.session.scalar(db.select(User).where(User.username == username))
    if user is None or not user.check_password(password):
        audit("login", username, outcome="denied", user=username or "anonymous", address=address)
        if not wants_json():
            flash("Unknown user or wrong password.")
        return answer({"error": "unknown user or wrong password"}, "login.html", 401)
    throttle.succeeded(username, address)
    _sign_in(user, "password")
    return answer({"user": user.username, "admin": user.is_admin},
                  to=same_origin_path(request.args.get("next", "")) or url_for("datasets.datasets"))


def _oauth():
    oauth = current_app.extensions.get("vf.oauth")
    if oauth is None:
        abort(404)
    return oauth


@bp.get("/login/sso")
def login_sso():
    return _oauth().sso.authorize_redirect(url_for("auth.sso_callback", _external=True))


@bp.get("/auth/callback")
def sso_callback():
    info = _oauth().sso.authorize_access_token().get("userinfo") or {}
    username = info.get("preferred_username") or info.get("email")
    if not username:
        abort(400, "the identity provider sent no preferred_username or email")
    user = db.session.scalar(db.select(User).where(User.username == username))
    if user is None:  # first SSO sign-in: an account with no grants (least privilege)
        user = User(username=username)
        db.session.add(user)
        db.session.commit()
    _sign_in(user, "oidc")
    return redirect(url_for("datasets.datasets"))


@bp.post("/logout")
@login_required
def logout():
    audit("logout", current_user.username)
    logout_user()
    return redirect(url_for("auth.login"))


@bp.get("/")
def index():
    return redirect(url_for("datasets.datasets"))
