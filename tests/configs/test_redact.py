"""configs/redact.py: every form of secret the project's configs, commands and environments carry is masked by the
one function every output goes through, and what is not secret is left as it is (issue 20, item 2)."""

from __future__ import annotations

import pytest

from vitvq.configs.redact import MASK, looks_secret, redact, redact_config

V = "s3cr3t-VALUE-17"

SECRET_FORMS = {
    "URI userinfo": f"pipe:curl -s https://alice:{V}@host/x.tar",
    "?token=": f"https://h/x-000001.tar?token={V}&n=1",
    "X-Amz-Signature=": f"s3://b/k?X-Amz-Credential=AKIA&X-Amz-Signature={V}",
    "curl -u": f"pipe:curl -s -u user:{V} https://h/x.tar",
    "--user": f"pipe:curl --user user:{V} https://h/x.tar",
    "--user=": f"pipe:wget --user=user:{V} https://h/x.tar",
    "Bearer header": f'pipe:curl -H "Authorization: Bearer {V}" https://h/x.tar',
    "Bearer header, single quotes": f"pipe:curl --header 'Authorization: Bearer {V}' https://h/x.tar",
    "Azure AccountKey": f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={V};EndpointSuffix=core.windows.net",
    "Azure AccountKey, quoted in an assignment": f"pipe:CONN='AccountName=a;AccountKey={V};' az storage blob download",
    "Azure SharedAccessSignature": f"BlobEndpoint=https://acct.blob.core.windows.net;SharedAccessSignature={V}",
    "YAML password": f"db:\n  password: {V}\n  host: h",
    "JSON password": f'{{"password": "{V}", "user": "bob"}}',
    "dict repr of an env": f"{{'HF_TOKEN': '{V}', 'A': 'b'}}",
    "env assignment": f"HF_TOKEN={V} MLFLOW_TRACKING_PASSWORD={V} python launch/ray_train.py",
    "--password value": f"mlflow server --password {V}",
}


@pytest.mark.parametrize("form", sorted(SECRET_FORMS))
def test_every_secret_form_is_masked(form: str) -> None:
    out = redact(SECRET_FORMS[form])
    assert V not in out and MASK in out, out


def test_what_stays_readable() -> None:
    assert redact(SECRET_FORMS["curl -u"]) == "pipe:curl -s -u user:*** https://h/x.tar"  # the user is no secret
    assert redact(SECRET_FORMS["Bearer header"]) == 'pipe:curl -H "Authorization: Bearer ***" https://h/x.tar'
    assert redact(SECRET_FORMS["Azure AccountKey"]) == (
        "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=***;EndpointSuffix=core.windows.net")
    for plain in ("http://127.0.0.1:8265", "sqlite:////tmp/mlflow.db", "train.steps: 10", "pipe:curl -s -u alice x",
                  "/data/x-{000000..000127}.tar", "tokens: /data/t.json", "key_count: 5", "14:30",
                  "pipe:aws s3 cp s3://bucket/x-000001.tar -"):
        assert redact(plain) == plain
    assert not looks_secret("tokens.train_tokens") and not looks_secret("train.preempt_signal")
    assert looks_secret("AccountKey") and looks_secret("SharedAccessSignature") and looks_secret("Authorization")


def test_redact_config_flat_and_nested() -> None:
    flat = {"data.train_shards": SECRET_FORMS["curl -u"], "train.api_key": V, "train.steps": 10, "x.token": None,
            "data.list": [SECRET_FORMS["?token="]]}
    out = redact_config(flat)
    assert V not in str(out) and out["train.steps"] == 10 and out["train.api_key"] == MASK and out["x.token"] is None
    nested = {"data": {"train_shards": SECRET_FORMS["Bearer header"], "image_size": 32},
              "train": {"workers": [{"shard": SECRET_FORMS["URI userinfo"]}]}}
    out = redact_config(nested)
    assert V not in str(out) and out["data"]["image_size"] == 32
    assert out["data"]["train_shards"].startswith("pipe:curl -H")
