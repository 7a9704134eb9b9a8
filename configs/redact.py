"""What is secret, decided in one place: :func:`redact` for any text that is printed, logged or sent, and
:func:`redact_config` for config dumps and MLflow params.

Masked: values of secret-looking names (``HF_TOKEN``, ``apiKey``, ``--password``), ``user:password@`` in URIs and
signed-URL query parameters (``?token=``, ``X-Amz-Signature=``, ``sig=``, ``key=``). ``launch/submit.py``,
``trainer/cli.py``, ``trainer/tracking.py`` and the Trainer's ``config.json`` go through it. Standard library only,
so every layer may use it.
"""

from __future__ import annotations

import re
from typing import Any, Optional

MASK = "***"
SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "PASSPHRASE", "CREDENTIAL", "CREDENTIALS", "AUTH",
                "SIGNATURE", "SIG")

# -- secrets --------------------------------------------------------------------------------------
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s]*@")  # scheme://user:pass@host -> scheme://***@host
_ASSIGN = re.compile(r"""(?<![\w.\-])(-{0,2}[A-Za-z_][\w.\-]*)=("[^"]*"|'[^']*'|[^\s&"']+)""")  # NAME=v, ?name=v
_FLAG = re.compile(r"(?<!\S)(--?[A-Za-z][\w\-]*)([ \t]+)(?!-)(\S+)")  # --password value
_QUOTED = re.compile(r"""(["'])([A-Za-z_][\w.\-]*)\1(\s*:\s*)(["'])((?:(?!\4).)*)\4""")  # 'NAME': 'v' (dicts, JSON)


def looks_secret(name: str) -> bool:
    """Whether a variable, option or parameter name looks like it holds a secret: its last word (split at
    ``_ . -``) ends with TOKEN, KEY, SECRET, PASSWORD, SIG... (``HF_TOKEN``, ``apiKey``, ``X-Amz-Signature``,
    ``sig``, but not ``tokens.train_tokens``, ``tokenizer``, ``prior.token_dropout`` or ``train.preempt_signal``)."""
    words = [w for w in re.split(r"[^A-Z0-9]+", name.upper()) if w]
    return bool(words) and any(words[-1].endswith(s) for s in SECRET_WORDS)


def redact(text: str, name: Optional[str] = None) -> str:
    """``text`` safe to print: all of it masked when ``name`` looks secret; otherwise the user:password part of URIs,
    and the values of secret-looking ``NAME=value`` (query parameters too: ``?token=``, ``&sig=``),
    ``--secret-option value`` and ``'NAME': 'value'`` (Ray's error messages quote runtime envs as dicts)."""
    if name is not None and looks_secret(name):
        return MASK
    text = _USERINFO.sub(rf"\1{MASK}@", text)
    text = _ASSIGN.sub(lambda m: f"{m[1]}={MASK}" if looks_secret(m[1]) else m[0], text)
    text = _QUOTED.sub(lambda m: f"{m[1]}{m[2]}{m[1]}{m[3]}{m[4]}{MASK}{m[4]}" if looks_secret(m[2]) else m[0], text)
    return _FLAG.sub(lambda m: f"{m[1]}{m[2]}{MASK}" if looks_secret(m[1]) else m[0], text)


def redact_config(flat: dict[str, Any]) -> dict[str, Any]:
    """A flat config (``{"data.train_shards": "pipe:curl -s https://u:pw@host/x.tar", ...}``) safe to dump or log
    as MLflow params: a value whose key looks secret is masked, string values lose embedded credentials; every
    other value is kept as it is (unset ones too, so that a masked field still shows it was set)."""
    out = {}
    for key, value in flat.items():
        if looks_secret(key) and value not in (None, "") and not isinstance(value, bool):
            out[key] = MASK
        else:
            out[key] = redact(value) if isinstance(value, str) else value
    return out


__all__ = ["MASK", "SECRET_WORDS", "looks_secret", "redact", "redact_config"]
