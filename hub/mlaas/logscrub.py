"""Keep secrets that travel in URLs out of every log line of a platform process.

OAuth's `code=` and `state=`, tokens and XSRF values ride in query strings, and libraries log
URLs in warnings and exception messages (tornado's "Uncaught exception GET /hub/oauth_callback?
code=…", oauthenticator's state errors). JupyterHub scrubs its own request lines only. Installed
once per process, this scrubs every record, message and traceback alike, whatever logger made it.
"""

from __future__ import annotations

import logging
import re
import traceback

SECRET_PARAMS = ("code", "state", "token", "access_token", "refresh_token", "id_token", "client_secret",
                 "_xsrf", "session_state", "password")
_PARAM = re.compile(r"(?i)(?<![A-Za-z0-9_])(" + "|".join(map(re.escape, SECRET_PARAMS)) + r")=(?!\[secret\])([^&\s\"'#,;)\]}]+)")
_AUTH = re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?(?:token|bearer|jupyterhub)\s+)[^\s\"',}]+")


def scrub(text: str) -> str:
    return _AUTH.sub(r"\1[secret]", _PARAM.sub(r"\1=[secret]", text))


def _scrubbed(record: logging.LogRecord) -> logging.LogRecord:
    try:
        message = record.getMessage()
    except Exception:  # a broken format string stays the logging module's problem
        return record
    record.msg, record.args = scrub(message), ()
    if record.exc_info and not record.exc_text:
        record.exc_text = scrub("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
    return record


_installed = False


def install() -> None:
    """Scrub every log record this process creates from now on (idempotent)."""
    global _installed
    if _installed:
        return
    factory = logging.getLogRecordFactory()

    def make(*args, **kwargs) -> logging.LogRecord:
        return _scrubbed(factory(*args, **kwargs))

    logging.setLogRecordFactory(make)
    _installed = True
