"""What is secret, decided in one place: :func:`redact` for any text that is printed, logged or sent,
:func:`redact_config` for config dumps (``config.json``, a checkpoint's ``meta.json``) and MLflow params, and
:func:`looks_secret` for names. Everything the project writes or sends goes through it (issue 20, item 2):
config dumps, MLflow params, tags, run and experiment names, printed lines and Ray runtime envs.

Masked: values of secret-looking names (``HF_TOKEN=``, ``--password v``, ``apiKey: v``, ``"token": "v"``,
``Authorization: Bearer v``, Azure ``AccountKey=v;``), ``user:password@`` in URIs, signed-URL query parameters
(``?token=``, ``X-Amz-Signature=``, ``sig=``) and the password of ``curl -u/--user user:password``. Standard library
only, so every layer may use it.
"""

from __future__ import annotations

import re
from typing import Any, Optional

MASK = "***"
SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "PASSPHRASE", "CREDENTIAL", "CREDENTIALS", "AUTH",
                "AUTHORIZATION", "SIGNATURE", "SIG", "COOKIE")

# -- secrets --------------------------------------------------------------------------------------
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s]*@")  # scheme://user:pass@host -> scheme://***@host
# NAME=v, ?name=v, ;AccountKey=v; (a value stops at & and ;, so each part of a connection string is seen)
_ASSIGN = re.compile(r"""(?<![\w.\-])(-{0,2}[A-Za-z_][\w.\-]*)=("[^"]*"|'[^']*'|[^\s&;"']+)""")
_FLAG = re.compile(r"(?<!\S)(--?[A-Za-z][\w\-]*)([ \t]+)(?!-)(\S+)")  # --password value
# curl/wget -u user:pass, --user user:pass, --proxy-user=user:pass: the user stays, the password goes
_USERFLAG = re.compile(r"""(?<!\S)(-u|-U|--user|--proxy-user)([ \t]*=?[ \t]*)(["']?)([^\s:"']*):([^\s"']+)""")
# NAME: value, 'NAME': 'value', "NAME": value (YAML, JSON, Python dicts, HTTP headers); a scheme word is kept
_COLON = re.compile(r"""(?<![\w.\-])(["']?)([A-Za-z_][\w.\-]*)\1([ \t]*:[ \t]*)"""
                    r"""((?:Bearer|Basic|Token|Digest|Negotiate|Bot)[ \t]+)?("[^"\n]*"|'[^'\n]*'|[^\s,;}\]"']+)""")


def looks_secret(name: str) -> bool:
    """Whether a variable, option, header or parameter name looks like it holds a secret: its last word (split at
    ``_ . -``) ends with TOKEN, KEY, SECRET, PASSWORD, SIG, AUTHORIZATION... (``HF_TOKEN``, ``apiKey``,
    ``AccountKey``, ``X-Amz-Signature``, ``sig``, but not ``tokens.train_tokens``, ``tokenizer``,
    ``prior.token_dropout`` or ``train.preempt_signal``)."""
    words = [w for w in re.split(r"[^A-Z0-9]+", name.upper()) if w]
    return bool(words) and any(words[-1].endswith(s) for s in SECRET_WORDS)


def _masked(value: str) -> str:
    """A value masked, its quotes kept."""
    return f"{value[0]}{MASK}{value[0]}" if value[:1] in ("'", '"') and len(value) > 1 else MASK


def _assignment(m: re.Match) -> str:
    """``NAME=value`` masked when NAME looks secret; a quoted value of another name is redacted inside (a
    connection string: ``AZURE_STORAGE_CONNECTION_STRING='...;AccountKey=v;...'``)."""
    name, value = m[1], m[2]
    if looks_secret(name):
        return f"{name}={_masked(value)}"
    if value[:1] in ("'", '"') and len(value) > 1:
        return f"{name}={value[0]}{redact(value[1:-1])}{value[-1]}"
    return m[0]


def redact(text: str, name: Optional[str] = None) -> str:
    """``text`` safe to print: all of it masked when ``name`` looks secret; otherwise the user:password part of URIs,
    the values of secret-looking ``NAME=value`` (query parameters too: ``?token=``, ``&sig=``), ``--secret-option
    value``, ``NAME: value`` (YAML, JSON, dicts, ``Authorization: Bearer x`` headers) and ``-u user:password``."""
    if name is not None and looks_secret(name):
        return MASK
    text = _USERINFO.sub(rf"\1{MASK}@", text)
    text = _USERFLAG.sub(lambda m: f"{m[1]}{m[2]}{m[3]}{m[4]}:{MASK}", text)
    text = _ASSIGN.sub(_assignment, text)
    text = _COLON.sub(lambda m: f"{m[1]}{m[2]}{m[1]}{m[3]}{m[4] or ''}{_masked(m[5])}" if looks_secret(m[2]) else m[0],
                      text)
    return _FLAG.sub(lambda m: f"{m[1]}{m[2]}{MASK}" if looks_secret(m[1]) else m[0], text)


def redact_config(config: dict[str, Any]) -> dict[str, Any]:
    """A config, flat (``{"data.train_shards": "pipe:curl -u u:pw ...", ...}``) or nested (``to_dict(cfg)``), safe to
    dump or log as MLflow params: a value whose key looks secret is masked, strings (in lists too) lose embedded
    credentials; every other value is kept as it is (unset ones too, so that a masked field still shows it was set).
    A masked copy is a record, never a config to run: rebuild from it only fields that cannot hold secrets (the
    model's), and take everything else from the live config."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if looks_secret(str(key)) and value not in (None, "") and not isinstance(value, (bool, dict)):
            out[key] = MASK
        else:
            out[key] = _redact_value(value)
    return out


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return redact_config(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value(v) for v in value)
    return value


__all__ = ["MASK", "SECRET_WORDS", "looks_secret", "redact", "redact_config"]
