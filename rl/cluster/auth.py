"""Ray's authentication mode for this process, set explicitly (never left to whatever ~/.ray holds).

Ray reads RAY_AUTH_MODE into its C++ config once per process, and caches the token it loaded; a process that
changes the mode (a test session running a local token cluster and then a job client for a cluster without
authentication, a second run after ray.shutdown) must refresh both, or Ray keeps acting on the old ones. Only
the standard library at import: the job client (launch/submit.py) uses this without torch or rl.cluster.session.
"""
from __future__ import annotations

import os
import secrets

AUTH_MODES = ("disabled", "token")


def resolve_auth_mode(configured: str | None, local: bool) -> str:
    """The mode a run uses: what the config names; unnamed, `token` for a cluster the run starts itself (Ray
    2.60's own default for a new local cluster) and `disabled` for one it joins or submits to (whose mode only the
    person who started it knows: the config names it)."""
    if configured is not None:
        return configured
    return "token" if local else "disabled"


def new_local_token() -> str:
    """A token for a cluster this process is about to start. It lives only in this process's environment, which
    the cluster's processes (GCS, raylet, workers, agents) inherit: no file another cluster could pick up or leave
    behind, and nothing in a runtime_env (which Ray stores in its job table and shows in the dashboard)."""
    token = secrets.token_hex(32)
    os.environ["RAY_AUTH_TOKEN"] = token  # Ray reads it before RAY_AUTH_TOKEN_PATH and ~/.ray/auth_token
    return token


def apply_auth_mode(mode: str) -> None:
    """Export RAY_AUTH_MODE and make this process's Ray (if imported) act on it and on the current token."""
    if mode not in AUTH_MODES:
        raise ValueError(f"RAY_AUTH_MODE must be one of {AUTH_MODES}, got {mode!r}")
    os.environ["RAY_AUTH_MODE"] = mode
    try:
        from ray._raylet import AuthenticationMode, AuthenticationTokenLoader, Config, get_authentication_mode
    except ImportError:  # a Ray without token authentication: the variable is all there is
        return
    wanted = AuthenticationMode.TOKEN if mode == "token" else AuthenticationMode.DISABLED
    if get_authentication_mode() != wanted:
        Config.initialize("")  # re-reads RAY_AUTH_MODE (what Ray's own token-by-default path does)
    AuthenticationTokenLoader.instance().reset_cache()
